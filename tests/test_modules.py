"""Flax linen and NNX modules against the functional core and against Flax's own RNN drivers."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization

import jaxlstm
import jaxlstm.linen as jl
import jaxlstm.nnx as jn

B, T, I, H = 3, 6, 4, 5
LENGTHS = jnp.array([6, 2, 0])


def inputs(dtype=jnp.float64, seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, I), dtype)


# ------------------------------------------------------------------ linen


@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (3, False), (2, True)])
@pytest.mark.parametrize("output_transform", [True, False])
def test_linen_module_equals_functional_core(num_layers, bidirectional, output_transform):
    xs = inputs()
    model = jl.LSTM(H, num_layers=num_layers, bidirectional=bidirectional, output_transform=output_transform,
                    param_dtype=jnp.float64)
    variables = model.init(jax.random.key(1), xs)
    ys, states = model.apply(variables, xs, seq_lengths=LENGTHS, return_state=True)
    layers = model.layers(variables)
    ref_ys, ref_states = jaxlstm.lstm_stack(layers, xs, seq_lengths=LENGTHS)
    np.testing.assert_array_equal(ys, ref_ys)
    for a, b in zip(jax.tree.leaves(states), jax.tree.leaves(ref_states)):
        np.testing.assert_array_equal(a, b)
    assert all(layer_is(layers, bidirectional, output_transform))
    # and back: variables_from(layers) reproduces the variables exactly
    back = model.variables_from(layers)
    assert jax.tree.structure(back) == jax.tree.structure(jax.tree.map(lambda a: a, dict(variables)))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)


def layer_is(layers, bidirectional, output_transform):
    for layer in layers:
        ps = [layer.forward, layer.backward] if bidirectional else [layer]
        yield all(p.output_transform == output_transform for p in ps)


def test_linen_rnn_of_cell_equals_module():
    xs = inputs()
    model = jl.LSTM(H, param_dtype=jnp.float64)
    variables = model.init(jax.random.key(1), xs)
    rnn = nn.RNN(jl.LSTMCell(H, param_dtype=jnp.float64), return_carry=True)
    rnn_vars = {"params": {"cell": variables["params"]["layer_0"]}}
    s0 = jaxlstm.LSTMState(jnp.full((B, H), 0.3), jnp.full((B, H), -0.2))
    carry, ys_rnn = rnn.apply(rnn_vars, xs, initial_carry=s0, seq_lengths=LENGTHS)
    ys, states = model.apply(variables, xs, [s0], seq_lengths=LENGTHS, return_state=True)
    for b, L in enumerate(LENGTHS.tolist()):  # flax.linen.RNN runs through padding; compare valid steps
        np.testing.assert_allclose(ys[b, :L], ys_rnn[b, :L], rtol=1e-12, atol=1e-12)
    # Flax picks the carry at index L - 1, which for L = 0 wraps to the last step;
    # jaxlstm returns the initial state there. Compare the sequences with L > 0.
    valid = np.asarray(LENGTHS) > 0
    np.testing.assert_allclose(states[0].cell[valid], carry[0][valid], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(states[0].hidden[valid], carry[1][valid], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(states[0].cell[~valid], s0.cell[~valid])


def test_linen_bidirectional_of_cells_equals_module(peer_promotion):
    xs = inputs()
    model = jl.LSTM(H, bidirectional=True, param_dtype=jnp.float64)
    variables = model.init(jax.random.key(1), xs)
    cell = lambda: jl.LSTMCell(H, param_dtype=jnp.float64)
    bi = nn.Bidirectional(nn.RNN(cell()), nn.RNN(cell()))
    p = variables["params"]
    bi_vars = {"params": {"forward_rnn": {"cell": p["layer_0_forward"]}, "backward_rnn": {"cell": p["layer_0_backward"]}}}
    ys_bi = bi.apply(bi_vars, xs, seq_lengths=LENGTHS)
    ys = model.apply(variables, xs, seq_lengths=LENGTHS)
    for b, L in enumerate(LENGTHS.tolist()):
        np.testing.assert_allclose(ys[b, :L], ys_bi[b, :L], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ NNX


@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, False), (2, True)])
def test_nnx_module_equals_functional_core(num_layers, bidirectional):
    xs = inputs()
    model = jn.LSTM(I, H, num_layers=num_layers, bidirectional=bidirectional, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    ys, states = model(xs, seq_lengths=LENGTHS, return_state=True)
    ref_ys, ref_states = jaxlstm.lstm_stack(model.layers, xs, seq_lengths=LENGTHS)
    np.testing.assert_array_equal(ys, ref_ys)
    for a, b in zip(jax.tree.leaves(states), jax.tree.leaves(ref_states)):
        np.testing.assert_array_equal(a, b)


def test_nnx_set_layers_round_trip_and_equals_linen():
    xs = inputs()
    lmodel = jl.LSTM(H, num_layers=2, bidirectional=True, param_dtype=jnp.float64)
    variables = lmodel.init(jax.random.key(3), xs)
    model = jn.LSTM(I, H, num_layers=2, bidirectional=True, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    model.set_layers(lmodel.layers(variables))
    np.testing.assert_array_equal(model(xs, seq_lengths=LENGTHS), lmodel.apply(variables, xs, seq_lengths=LENGTHS))
    for a, b in zip(jax.tree.leaves(model.layers), jax.tree.leaves(lmodel.layers(variables))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="shape"):
        jn.LSTM(I + 1, H, num_layers=2, bidirectional=True, param_dtype=jnp.float64, rngs=nnx.Rngs(0)).set_layers(
            lmodel.layers(variables)
        )


def test_nnx_rnn_of_cell_equals_module():
    xs = inputs()
    model = jn.LSTM(I, H, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    cell = jn.LSTMCell(I, H, param_dtype=jnp.float64, rngs=nnx.Rngs(1))
    cell.set_params(model.layers[0])
    rnn = nnx.RNN(cell, return_carry=True)
    carry, ys_rnn = rnn(xs, seq_lengths=LENGTHS)
    ys, states = model(xs, seq_lengths=LENGTHS, return_state=True)
    for b, L in enumerate(LENGTHS.tolist()):
        np.testing.assert_allclose(ys[b, :L], ys_rnn[b, :L], rtol=1e-12, atol=1e-12)
    valid = np.asarray(LENGTHS) > 0  # see the linen test: Flax wraps L = 0 to the last step
    np.testing.assert_allclose(states[0].hidden[valid], carry[1][valid], rtol=1e-12, atol=1e-12)
    bi = nnx.Bidirectional(nnx.RNN(cell), nnx.RNN(cell))
    assert bi(xs).shape == (B, T, 2 * H)


# ------------------------------------------------------------------ dropout


def recover_constant_masks(params, xs, ys, rate):
    """For each sequence, the constant recurrent mask (if any) that reproduces ``ys`` exactly."""
    scale = 1.0 / (1.0 - rate)
    found = []
    for b in range(xs.shape[0]):
        match = None
        for bits in itertools.product([0.0, scale], repeat=params.hidden_size):
            m = jnp.asarray(bits, xs.dtype)
            y, _ = jaxlstm.lstm(params, xs[b], recurrent_mask=m)
            if np.allclose(y, ys[b], rtol=1e-12, atol=1e-12):
                match = bits
                break
        found.append(match)
    return found


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_recurrent_dropout_one_mask_per_sequence(api):
    Hs, Bs, rate = 4, 6, 0.5
    xs = jax.random.normal(jax.random.key(0), (Bs, 7, I), jnp.float64)
    if api == "linen":
        model = jl.LSTM(Hs, recurrent_dropout_rate=rate, param_dtype=jnp.float64)
        variables = model.init(jax.random.key(1), xs, deterministic=True)
        params = model.layers(variables)[0]
        run = lambda key, det: model.apply(variables, xs, deterministic=det, rngs={"dropout": key})
    else:
        model = jn.LSTM(I, Hs, recurrent_dropout_rate=rate, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        params = model.layers[0]
        run = lambda key, det: model(xs, deterministic=det, rngs=nnx.Rngs(dropout=key))
    # deterministic mode is exactly dropout-free
    np.testing.assert_array_equal(run(jax.random.key(5), True), jaxlstm.lstm(params, xs)[0])
    # training: every sequence's outputs are reproduced by one constant mask
    masks1 = recover_constant_masks(params, xs, run(jax.random.key(5), False), rate)
    masks2 = recover_constant_masks(params, xs, run(jax.random.key(6), False), rate)
    assert all(m is not None for m in masks1 + masks2), "some sequence used a mask that changed over time"
    assert len(set(masks1)) > 1, "all sequences got the same mask"
    assert masks1 != masks2, "different rngs gave the same masks"


def test_nnx_eval_and_train_switch_dropout():
    xs = inputs(jnp.float32)
    model = jn.LSTM(I, H, num_layers=2, dropout_rate=0.5, rngs=nnx.Rngs(0))
    train_a, train_b = model(xs), model(xs)
    assert not np.allclose(train_a, train_b)  # the kept rng stream advances
    model.eval()
    np.testing.assert_array_equal(model(xs), jaxlstm.lstm_stack(model.layers, xs)[0])
    model.train()
    assert not np.allclose(model(xs), jaxlstm.lstm_stack(model.layers, xs)[0])


def test_linen_dropout_requires_deterministic():
    model = jl.LSTM(H, num_layers=2, dropout_rate=0.2)
    with pytest.raises(ValueError, match="deterministic"):
        model.init(jax.random.key(0), inputs(jnp.float32))


# ------------------------------------------------------------------ training, transforms, serialization


def toy_task(n=64, T=12, vocab=6, seed=0):
    """Label 1 iff token 1 occurs in the (variable-length) sequence."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, vocab, size=(n, T))
    lengths = rng.integers(3, T + 1, size=n)
    labels = rng.integers(0, 2, size=n)
    for i in range(n):
        if labels[i]:
            tokens[i, rng.integers(0, lengths[i])] = 1
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32), jnp.asarray(labels, jnp.int32)


def test_linen_classifier_learns(peer_promotion):
    tokens, lengths, labels = toy_task()
    model = jl.SequenceClassifier(vocab_size=6, embed_dim=8, hidden_size=16, num_classes=2)
    params = model.init(jax.random.key(0), tokens, lengths)
    tx = optax.adam(2e-2)
    opt = tx.init(params)

    def loss_fn(p):
        logits = model.apply(p, tokens, lengths)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    losses = []
    for _ in range(60):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    assert losses[0] > 0.6
    assert losses[-1] < 0.25 * losses[0], losses[::10]


def test_nnx_classifier_learns_with_nnx_jit(peer_promotion):
    tokens, lengths, labels = toy_task(seed=1)
    model = jn.SequenceClassifier(6, 8, 16, 2, bidirectional=True, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(2e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(m):
            logits = m(tokens, lengths)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(60)]
    assert losses[0] > 0.6
    assert losses[-1] < 0.25 * losses[0], losses[::10]


def test_char_lm_models_agree_across_apis():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 20, size=(2, 9)), jnp.int32)
    lm = jn.CharLM(20, 8, 12, num_layers=2, rngs=nnx.Rngs(0))
    logits, states = lm(tokens, return_state=True)
    # the same maths by hand from the functional API
    x = lm.embed(tokens)
    ys, _ = jaxlstm.lstm_stack(lm.lstm.layers, x)
    np.testing.assert_allclose(logits, lm.head(ys), rtol=1e-6)
    # continuing from the returned state equals running the whole sequence
    full = lm(jnp.concatenate([tokens, tokens], axis=1))
    second = lm(tokens, states)
    np.testing.assert_allclose(full[:, 9:], second, rtol=1e-5, atol=1e-6)
    llm = jl.CharLM(20, 8, 12, num_layers=2)
    v = llm.init(jax.random.key(0), tokens)
    assert llm.apply(v, tokens).shape == (2, 9, 20)


def test_nnx_split_merge_state_round_trip():
    xs = inputs(jnp.float32)
    model = jn.LSTM(I, H, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    again = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(again(xs), model(xs))
    # serialize the state as a pure dict and restore into a fresh model
    pure = nnx.to_pure_dict(nnx.state(model))
    raw = serialization.msgpack_restore(serialization.msgpack_serialize(pure))
    fresh = jn.LSTM(I, H, num_layers=2, bidirectional=True, rngs=nnx.Rngs(42))
    assert not np.allclose(fresh(xs), model(xs))
    fstate = nnx.state(fresh)
    nnx.replace_by_pure_dict(fstate, raw)
    nnx.update(fresh, fstate)
    np.testing.assert_array_equal(fresh(xs), model(xs))


def test_linen_serialization_and_jit_round_trip():
    xs = inputs(jnp.float32)
    model = jl.LSTM(H, num_layers=2)
    variables = model.init(jax.random.key(0), xs)
    blob = serialization.to_bytes(variables)
    restored = serialization.from_bytes(jax.tree.map(jnp.zeros_like, variables), blob)
    np.testing.assert_array_equal(jax.jit(model.apply)(restored, xs), model.apply(variables, xs))


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_bfloat16_compute_close_to_float32(api):
    xs = inputs(jnp.float32)
    if api == "linen":
        m32 = jl.LSTM(H, num_layers=2)
        variables = m32.init(jax.random.key(0), xs)
        y32 = m32.apply(variables, xs)
        y16 = jl.LSTM(H, num_layers=2, dtype=jnp.bfloat16).apply(variables, xs)
    else:
        m = jn.LSTM(I, H, num_layers=2, rngs=nnx.Rngs(0))
        y32 = m(xs)
        m16 = jn.LSTM(I, H, num_layers=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
        m16.set_layers(m.layers)
        y16 = m16(xs)
    assert y16.dtype == jnp.bfloat16
    # bf16 has an 8-bit mantissa: documented tolerance 5e-2 absolute on outputs in (-1, 1)
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=5e-2)
    assert float(jnp.abs(y16.astype(jnp.float32) - y32).mean()) < 1e-2


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_half_precision_param_dtype_initialises(api):
    """param_dtype=bfloat16 initialises (in float32, then rounded) and runs."""
    xs = jnp.ones((2, 5, 3), jnp.bfloat16)
    if api == "linen":
        model = jl.LSTM(4, param_dtype=jnp.bfloat16)
        variables = model.init(jax.random.key(0), xs)
        ys = model.apply(variables, xs)
        leaves = jax.tree.leaves(variables)
    else:
        model = jn.LSTM(3, 4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        ys = model(xs)
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert {a.dtype for a in leaves} == {jnp.dtype(jnp.bfloat16)}
    assert ys.shape == (2, 5, 4) and bool(jnp.isfinite(ys.astype(jnp.float32)).all())


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_zero_hidden_size_is_a_clear_error(api):
    with pytest.raises(ValueError, match="hidden_size must be a positive int; received 0"):
        if api == "linen":
            jl.LSTM(0).init(jax.random.key(0), jnp.ones((2, 3, 4)))
        else:
            jn.LSTM(4, 0, rngs=nnx.Rngs(0))
