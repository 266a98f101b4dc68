"""What both module APIs share: dropout masks, dtypes, errors, the example models agreeing across APIs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlstm
import jaxlstm.linen as jl
import jaxlstm.nnx as jn

B, T, I, H = 3, 6, 4, 5
LENGTHS = jnp.array([6, 2, 0])


def inputs(dtype=jnp.float64, seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, I), dtype)


# ------------------------------------------------------------------ linen


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


@pytest.mark.slow  # many compilations: the slow tier (CI)
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


@pytest.mark.slow  # many compilations: the slow tier (CI)
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


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_modules_take_a_step_mask(api):
    xs = inputs()
    valid = jnp.asarray(np.array([[0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 0, 0], [0] * 6], bool))
    if api == "linen":
        model = jl.LSTM(H, num_layers=2, bidirectional=True, param_dtype=jnp.float64)
        variables = model.init(jax.random.key(0), xs)
        ys, states = model.apply(variables, xs, mask=valid, return_state=True)
        layers = model.layers(variables)
    else:
        model = jn.LSTM(I, H, num_layers=2, bidirectional=True, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        ys, states = model(xs, mask=valid, return_state=True)
        layers = model.layers
    ref_ys, ref_states = jaxlstm.lstm_stack(layers, xs, mask=valid)
    np.testing.assert_array_equal(ys, ref_ys)
    for a, b in zip(jax.tree.leaves(states), jax.tree.leaves(ref_states)):
        np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(ys[2]).max()) == 0.0


# ------------------------------------------------------------------ Flax's cell protocol


def make_cell(api, dtype=None, seed=0):
    if api == "linen":
        cell = jl.LSTMCell(H, dtype=dtype, output_transform=False)
        return cell, lambda xs: nn_rnn(cell, xs, seed)
    cell = jn.LSTMCell(I, H, dtype=dtype, output_transform=False, rngs=nnx.Rngs(seed))
    return cell, None


def nn_rnn(cell, xs, seed):
    import flax.linen as nn

    rnn = nn.RNN(cell)
    return rnn.apply(rnn.init(jax.random.key(seed), xs), xs)


@pytest.mark.slow  # many compilations: the slow tier (CI)
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_flax_rnn_drives_a_half_precision_cell(api, peer_promotion):
    """nn.RNN / nnx.RNN scan the carry: its dtype is the same in and out (float32) with bfloat16 compute."""
    xs = inputs(jnp.float32)
    if api == "linen":
        ys = make_cell(api, jnp.bfloat16)[1](xs)
        ref = make_cell(api)[1](xs)
    else:
        cell = make_cell(api, jnp.bfloat16)[0]
        carry = cell.initialize_carry(xs[:, 0].shape)
        assert type(carry) is tuple and carry[0].dtype == carry[1].dtype == jnp.float32
        (c, h), y = cell(carry, xs[:, 0])
        assert c.dtype == h.dtype == jnp.float32 and y.dtype == jnp.bfloat16
        ys = nnx.RNN(cell)(xs)
        cell32 = make_cell(api)[0]
        ref = nnx.RNN(cell32)(xs)
    assert ys.dtype == jnp.bfloat16 and ys.shape == (B, T, H)
    np.testing.assert_allclose(np.asarray(ys, np.float32), ref, atol=5e-2)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_cell_returns_the_carry_structure_it_was_given(api, peer_promotion):
    xs = inputs()
    c0, h0 = jnp.zeros((B, H)), jnp.ones((B, H)) * 0.1
    if api == "linen":
        import flax.linen as nn

        cell = jl.LSTMCell(H, param_dtype=jnp.float64)
        variables = cell.init(jax.random.key(0), jaxlstm.LSTMState(c0, h0), xs[:, 0])
        step = lambda carry, x: cell.apply(variables, carry, x)
        rnn = nn.RNN(cell, return_carry=True)
        carry, ys = rnn.apply({"params": {"cell": variables["params"]}}, xs, initial_carry=(c0, h0))
    else:
        cell = jn.LSTMCell(I, H, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        step = cell
        carry, ys = nnx.RNN(cell, return_carry=True)(xs, initial_carry=(c0, h0))
    assert type(carry) is tuple  # a plain (c, h) in, a plain (c, h) out
    new, _ = step((c0, h0), xs[:, 0])
    assert type(new) is tuple
    new_state, _ = step(jaxlstm.LSTMState(c0, h0), xs[:, 0])
    assert isinstance(new_state, jaxlstm.LSTMState)
    np.testing.assert_array_equal(new[0], new_state.cell)
    with pytest.raises(TypeError, match=r"carry of an LSTM cell is a pair \(cell, hidden\).*3 items"):
        step((c0, h0, h0), xs[:, 0])


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_stack_initialize_carry_and_a_bare_state_for_one_layer(api, bidirectional):
    xs = inputs()
    if api == "linen":
        model = jl.LSTM(H, bidirectional=bidirectional, param_dtype=jnp.float64)
        variables = model.init(jax.random.key(0), xs)
        run = lambda *a, **k: model.apply(variables, *a, **k)
        carry = model.initialize_carry(None, xs.shape)
        layers = model.layers(variables)
    else:
        model = jn.LSTM(I, H, bidirectional=bidirectional, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        run = model
        carry = model.initialize_carry(xs.shape)
        layers = model.layers
    # initialize_carry has the structure return_state gives back
    _, states = run(xs, return_state=True)
    assert jax.tree.structure(carry) == jax.tree.structure(states)
    assert all(
        a.shape == b.shape and a.dtype == b.dtype for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(states))
    )
    # a one-layer stack takes its state alone
    state = jax.tree.map(lambda a: a + 0.3, states[0])
    ys, finals = run(xs, state, return_state=True)
    ref_ys, ref_finals = jaxlstm.lstm_stack(layers, xs, (state,))
    np.testing.assert_array_equal(ys, ref_ys)
    np.testing.assert_array_equal(jax.tree.leaves(finals)[0], jax.tree.leaves(ref_finals)[0])


def test_functional_stack_refuses_one_state_for_several_layers():
    layers = jaxlstm.init_stack(jax.random.key(0), I, H, num_layers=2, dtype=jnp.float64)
    state = jaxlstm.zero_state(layers[0], (B,))
    with pytest.raises(ValueError, match=r"received one state \(LSTMState\) for 2 layers"):
        jaxlstm.lstm_stack(layers, inputs(), state)


def test_linen_layers_are_one_parameter_entry_each_and_set_layers_keeps_other_collections():
    import flax.linen as nn

    xs = inputs()
    model = jl.LSTM(H, num_layers=2, param_dtype=jnp.float64)
    variables = model.init(jax.random.key(0), xs)
    # no submodule per direction: nn.tabulate lists the LSTM alone
    table = nn.tabulate(model, jax.random.key(0), depth=1)(xs)
    assert "_Direction" not in table and "layer_0" not in table.split("params")[0]
    # init equals the functional init for each layer (one key per layer, folded in by Flax)
    assert set(variables["params"]) == {"layer_0", "layer_1"}
    new = model.set_layers(
        {**variables, "stats": {"n": 1}}, jaxlstm.init_stack(jax.random.key(3), I, H, num_layers=2, dtype=jnp.float64)
    )
    assert new["stats"] == {"n": 1}
    with pytest.warns(DeprecationWarning, match="set_layers"):
        model.variables_from(model.layers(variables))


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_modules_with_merge_none(api):
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3), jnp.float64)
    if api == "linen":
        model = jl.LSTM(4, bidirectional=True, merge=None, param_dtype=jnp.float64)
        f, b = model.apply(model.init(jax.random.key(0), xs), xs)
        with pytest.raises(ValueError, match="no layer can follow it: use it with num_layers=1"):
            jl.LSTM(4, num_layers=2, bidirectional=True, merge=None).init(jax.random.key(0), xs)
    else:
        f, b = jn.LSTM(3, 4, bidirectional=True, merge=None, param_dtype=jnp.float64, rngs=nnx.Rngs(0))(xs)
        with pytest.raises(ValueError, match="no layer can follow it"):
            jn.LSTM(3, 4, num_layers=2, bidirectional=True, merge=None, rngs=nnx.Rngs(0))
    assert f.shape == b.shape == (2, 5, 4)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_modules_refuse_a_merge_that_drops_batch_or_time_before_a_layer(api):
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3), jnp.float64)
    scalar = lambda f, b: jnp.sum(f + b)
    message = r"merge=.* gives an array of shape \(\) .* one row of features per step"
    with pytest.raises(ValueError, match=message):
        if api == "linen":
            jl.LSTM(4, num_layers=2, bidirectional=True, merge=scalar).init(jax.random.key(0), xs)
        else:
            jn.LSTM(3, 4, num_layers=2, bidirectional=True, merge=scalar, rngs=nnx.Rngs(0))


@pytest.mark.slow  # trains or runs a peer: the slow tier (CI)
@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_learned_initial_state(api, bidirectional, peer_promotion):
    xs = inputs()
    D = 2 if bidirectional else 1
    kw = dict(num_layers=2, bidirectional=bidirectional, learn_initial_state=True, param_dtype=jnp.float64)
    if api == "linen":
        model = jl.LSTM(H, **kw)
        variables = model.init(jax.random.key(0), xs)
        params = variables["params"]
        layers = model.layers(variables)

        def loss(cell, hidden):
            p = {**params, "initial_cell": cell, "initial_hidden": hidden}
            return jnp.sum(model.apply({"params": p}, xs, seq_lengths=LENGTHS) ** 2)

        cell, hidden = params["initial_cell"], params["initial_hidden"]
        plain = jl.LSTM(H, num_layers=2, bidirectional=bidirectional, param_dtype=jnp.float64)
        assert "initial_cell" not in plain.init(jax.random.key(0), xs)["params"]
    else:
        model = jn.LSTM(I, H, **kw, rngs=nnx.Rngs(0))
        layers = model.layers
        cell, hidden = model.initial_cell[...], model.initial_hidden[...]

        def objective(m):
            return jnp.sum(m(xs, seq_lengths=LENGTHS) ** 2)

        def loss(c, h):
            model.initial_cell[...], model.initial_hidden[...] = c, h
            return objective(model)

    # one (H,) cell and hidden state per layer and direction, zeros at init
    assert cell.shape == hidden.shape == (2, D, H)
    np.testing.assert_array_equal(cell, 0.0)
    # the learned state is broadcast over the batch: equal to passing it explicitly
    c1 = jax.random.normal(jax.random.key(7), cell.shape, jnp.float64)
    h1 = jnp.tanh(jax.random.normal(jax.random.key(8), cell.shape, jnp.float64))
    states = []
    for k in range(2):
        one = [jaxlstm.LSTMState(jnp.tile(c1[k, d], (B, 1)), jnp.tile(h1[k, d], (B, 1))) for d in range(D)]
        states.append(jaxlstm.BidirectionalState(*one) if bidirectional else one[0])
    ref, _ = jaxlstm.lstm_stack(layers, xs, states, seq_lengths=LENGTHS)
    np.testing.assert_allclose(loss(c1, h1), jnp.sum(ref**2), rtol=1e-13)
    # and it is trained: a gradient reaches every layer and direction (sequence 2 has length 0, its state is the output)
    if api == "linen":
        g_cell, g_hidden = jax.grad(loss, argnums=(0, 1))(c1, h1)
    else:
        loss(c1, h1)
        g = nnx.grad(objective)(model)
        g_cell, g_hidden = g["initial_cell"][...], g["initial_hidden"][...]
    assert bool((jnp.abs(g_cell).sum(-1) > 0).all()) and bool((jnp.abs(g_hidden).sum(-1) > 0).all())


def test_char_lm_input_dropout_drops_embedded_characters_only_in_training():
    """Training mode feeds the LSTM the embedding with a fraction ~p of its entries zeroed and the rest scaled
    by 1 / (1 - p); deterministic mode is the model without it (both APIs)."""
    p = 0.4
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 20, size=(8, 50)), jnp.int32)
    lm = jl.CharLM(20, 16, 12, input_dropout_rate=p)
    v = lm.init(jax.random.key(0), tokens, deterministic=True)
    plain = jl.CharLM(20, 16, 12).apply(v, tokens)
    np.testing.assert_array_equal(lm.apply(v, tokens, deterministic=True), plain)
    logits, inter = lm.apply(
        v, tokens, deterministic=False, rngs={"dropout": jax.random.key(3)}, capture_intermediates=True, mutable=True
    )
    x = inter["intermediates"]["Dropout_0"]["__call__"][0]
    embedded = np.asarray(v["params"]["Embed_0"]["embedding"])[np.asarray(tokens)]
    kept = x != 0
    np.testing.assert_allclose(np.asarray(x)[kept], embedded[kept] / (1 - p), rtol=1e-6)
    assert abs(1 - kept.mean() - p) < 0.03  # 6400 entries: 3 standard deviations ~ 0.018
    layers = jl.LSTM(12).layers({"params": v["params"]["LSTM_0"]})
    ys, _ = jaxlstm.lstm_stack(layers, x)
    dense = v["params"]["Dense_0"]
    np.testing.assert_allclose(logits, ys @ dense["kernel"] + dense["bias"][None, None], rtol=1e-5, atol=1e-6)
    nlm = jn.CharLM(20, 16, 12, input_dropout_rate=p, rngs=nnx.Rngs(0))
    nplain = jn.CharLM(20, 16, 12, rngs=nnx.Rngs(0))  # the same parameters: input dropout draws none
    np.testing.assert_array_equal(nlm(tokens, deterministic=True), nplain(tokens))
    assert not np.allclose(nlm(tokens, deterministic=False), nplain(tokens))


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_a_cell_subclass_that_repacks_the_carry_runs_in_flax_rnn(api):
    """Flax's recurrent-dropout pattern: a subclass unpacks the carry, changes ``h`` and calls the cell
    with a plain ``(c, h)``. Inside ``nn.RNN``/``nnx.RNN`` the carry from ``initialize_carry`` must
    have that structure too, as Flax's own cells' has, or the scan refuses the step."""
    xs = inputs()
    scale = 0.5  # a stand-in for a recurrent dropout mask: deterministic, so a reference exists

    if api == "linen":
        import flax.linen as nn

        class Scaled(jl.LSTMCell):
            @nn.compact
            def __call__(self, carry, x):
                c, h = carry
                return super().__call__((c, h * scale), x)

        rnn = nn.RNN(Scaled(H, param_dtype=jnp.float64))
        variables = rnn.init(jax.random.key(0), xs)
        ys = rnn.apply(variables, xs)
        params = jl.LSTMCell.to_params(variables["params"]["cell"])
    else:

        class Scaled(jn.LSTMCell):
            def __call__(self, carry, x):
                c, h = carry
                return super().__call__((c, h * scale), x)

        cell = Scaled(I, H, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        ys = nnx.RNN(cell)(xs)
        params = cell.params
    # the reference: the step written out with the scaled hidden state
    carry = jaxlstm.LSTMState(jnp.zeros((B, H)), jnp.zeros((B, H)))
    ref = []
    for t in range(T):
        carry, y = jaxlstm.lstm_step(params, jaxlstm.LSTMState(carry.cell, carry.hidden * scale), xs[:, t])
        ref.append(y)
    np.testing.assert_allclose(ys, jnp.stack(ref, 1), rtol=1e-12, atol=1e-12)
