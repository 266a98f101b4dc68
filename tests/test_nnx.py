"""jaxlstm.nnx: the cell and the stack against the functional core and Flax NNX; dropout, training, state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization

import jaxlstm
import jaxlstm.linen as jl
import jaxlstm.nnx as jn
from tests.helpers.tasks import toy_task

B, T, I, H = 3, 6, 4, 5
LENGTHS = jnp.array([6, 2, 0])


def inputs(dtype=jnp.float64, seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, I), dtype)


# ------------------------------------------------------------------ linen


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


def test_nnx_eval_and_train_switch_dropout():
    xs = inputs(jnp.float32)
    model = jn.LSTM(I, H, num_layers=2, dropout_rate=0.5, rngs=nnx.Rngs(0))
    train_a, train_b = model(xs), model(xs)
    assert not np.allclose(train_a, train_b)  # the kept rng stream advances
    model.eval()
    np.testing.assert_array_equal(model(xs), jaxlstm.lstm_stack(model.layers, xs)[0])
    model.train()
    assert not np.allclose(model(xs), jaxlstm.lstm_stack(model.layers, xs)[0])


@pytest.mark.slow  # trains or runs a peer: the slow tier (CI)
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


def test_nnx_per_call_reverse_and_time_major_as_linen():
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3), jnp.float32)
    model = jn.LSTM(3, 4, rngs=nnx.Rngs(0))
    layers = model.layers
    ys_rev = model(xs, reverse=True)
    ref_rev, _ = jaxlstm.lstm_stack(layers, xs, reverse=True)
    np.testing.assert_allclose(ys_rev, ref_rev, rtol=1e-6)
    ys_tm = model(jnp.swapaxes(xs, 0, 1), time_major=True)
    np.testing.assert_allclose(jnp.swapaxes(ys_tm, 0, 1), model(xs), rtol=1e-6)


@pytest.mark.parametrize("make", ["LSTMCell", "LSTM", "CharLM"])
def test_modules_without_rngs_say_what_they_need(make):
    """nnx.LSTM(rngs=None) was an AttributeError about 'params'."""
    from jaxlstm import nnx as jn

    args = {"LSTMCell": (3, 4), "LSTM": (3, 4), "CharLM": (10, 4, 8)}[make]
    with pytest.raises(TypeError, match=rf"jaxlstm.nnx.{make} needs rngs=nnx.Rngs\(...\).*received NoneType"):
        getattr(jn, make)(*args, rngs=None)
