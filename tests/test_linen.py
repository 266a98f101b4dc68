"""jaxlstm.linen: the cell and the stack against the functional core and Flax's drivers; dropout, training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import jaxlstm
import jaxlstm.linen as jl
from tests.helpers.tasks import toy_task

B, T, I, H = 3, 6, 4, 5
LENGTHS = jnp.array([6, 2, 0])


def inputs(dtype=jnp.float64, seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, I), dtype)


# ------------------------------------------------------------------ linen


@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (3, False), (2, True)])
@pytest.mark.parametrize("output_transform", [True, False])
def test_linen_module_equals_functional_core(num_layers, bidirectional, output_transform):
    xs = inputs()
    model = jl.LSTM(
        H,
        num_layers=num_layers,
        bidirectional=bidirectional,
        output_transform=output_transform,
        param_dtype=jnp.float64,
    )
    variables = model.init(jax.random.key(1), xs)
    ys, states = model.apply(variables, xs, seq_lengths=LENGTHS, return_state=True)
    layers = model.layers(variables)
    ref_ys, ref_states = jaxlstm.lstm_stack(layers, xs, seq_lengths=LENGTHS)
    np.testing.assert_array_equal(ys, ref_ys)
    for a, b in zip(jax.tree.leaves(states), jax.tree.leaves(ref_states)):
        np.testing.assert_array_equal(a, b)
    assert all(layer_is(layers, bidirectional, output_transform))
    # and back: set_layers(variables, layers) reproduces the variables exactly
    back = model.set_layers(variables, layers)
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


@pytest.mark.slow  # many compilations: the slow tier (CI)
def test_linen_bidirectional_of_cells_equals_module(peer_promotion):
    xs = inputs()
    model = jl.LSTM(H, bidirectional=True, param_dtype=jnp.float64)
    variables = model.init(jax.random.key(1), xs)
    cell = lambda: jl.LSTMCell(H, param_dtype=jnp.float64)
    bi = nn.Bidirectional(nn.RNN(cell()), nn.RNN(cell()))
    p = variables["params"]
    bi_vars = {
        "params": {"forward_rnn": {"cell": p["layer_0_forward"]}, "backward_rnn": {"cell": p["layer_0_backward"]}}
    }
    ys_bi = bi.apply(bi_vars, xs, seq_lengths=LENGTHS)
    ys = model.apply(variables, xs, seq_lengths=LENGTHS)
    for b, L in enumerate(LENGTHS.tolist()):
        np.testing.assert_allclose(ys[b, :L], ys_bi[b, :L], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ NNX


def test_linen_dropout_requires_deterministic():
    model = jl.LSTM(H, num_layers=2, dropout_rate=0.2)
    with pytest.raises(ValueError, match="deterministic"):
        model.init(jax.random.key(0), inputs(jnp.float32))


# ------------------------------------------------------------------ training, transforms, serialization


@pytest.mark.slow  # trains or runs a peer: the slow tier (CI)
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


def test_linen_serialization_and_jit_round_trip():
    xs = inputs(jnp.float32)
    model = jl.LSTM(H, num_layers=2)
    variables = model.init(jax.random.key(0), xs)
    blob = serialization.to_bytes(variables)
    restored = serialization.from_bytes(jax.tree.map(jnp.zeros_like, variables), blob)
    np.testing.assert_array_equal(jax.jit(model.apply)(restored, xs), model.apply(variables, xs))
