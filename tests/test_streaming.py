"""Streaming inference: chunks and single steps with the state carried equal one call over the whole sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm
from jaxlstm.linen import CharLM

B, T, I, H = 3, 11, 4, 6


def _stack(seed_cell=True):
    return jaxlstm.init_stack(jax.random.key(0), I, H, num_layers=2, output_transform=seed_cell, dtype=jnp.float64)


@pytest.mark.parametrize("seed_cell", [True, False], ids=["output_map", "classic"])
def test_chunks_and_steps_equal_the_whole_sequence(seed_cell):
    layers = _stack(seed_cell)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float64)
    want, finals = jaxlstm.lstm_stack(layers, xs)
    stepper = jaxlstm.Stepper.for_stack(layers, batch_size=B)
    got = [stepper(xs[:, :4]), stepper(xs[:, 4])[:, None], stepper(xs[:, 5:6]), stepper(xs[:, 6:])]
    np.testing.assert_allclose(jnp.concatenate(got, 1), want, rtol=1e-12, atol=1e-12)
    for s, f in zip(stepper.state, finals):
        np.testing.assert_allclose(s.cell, f.cell, rtol=1e-12, atol=1e-12)


def test_streams_are_independent_and_reset_starts_one_anew():
    layers = _stack()
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float64)
    stepper = jaxlstm.Stepper.for_stack(layers, batch_size=B)
    stepper(xs[:, :5])
    stepper.reset(rows=[1])  # row 1 starts a new stream: xs[1, 5:] from a zero state
    out = stepper(xs[:, 5:])
    fresh, _ = jaxlstm.lstm_stack(layers, xs[1:2, 5:])
    whole, _ = jaxlstm.lstm_stack(layers, xs)
    np.testing.assert_allclose(out[1], fresh[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out[np.array([0, 2])], whole[np.array([0, 2]), 5:], rtol=1e-12, atol=1e-12)
    stepper.reset()
    np.testing.assert_allclose(stepper(xs), whole, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 3\); received \[3\]"):
        stepper.reset(rows=[3])


def test_compiled_once_per_input_shape():
    traces = []

    def step(state, x):
        traces.append(x.shape)
        return jaxlstm.lstm_step(layers[0], state, x)

    layers = _stack()
    stepper = jaxlstm.Stepper(step, jaxlstm.zero_state(layers[0], (B,)))
    for t in range(5):
        stepper(jnp.full((B, I), float(t), jnp.float64))
    assert traces == [(B, I)]
    assert stepper.state.cell.shape == (B, H)


def test_a_flax_char_model_streams_token_by_token():
    """The character model as a server runs it: one token per stream per call, the state carried."""
    model = CharLM(vocab_size=7, embed_dim=5, hidden_size=H, num_layers=2)
    tokens = jax.random.randint(jax.random.key(2), (B, T), 0, 7)
    variables = model.init(jax.random.key(0), tokens)
    want = model.apply(variables, tokens)
    _, first = model.apply(variables, tokens[:, :1], return_state=True)
    zeros = jax.tree.map(jnp.zeros_like, first)

    def step(state, tok):
        logits, state = model.apply(variables, tok[:, None], state, return_state=True)
        return state, logits[:, 0]

    stepper = jaxlstm.Stepper(step, zeros)
    got = jnp.stack([stepper(tokens[:, t]) for t in range(T)], 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_what_cannot_stream_is_refused_in_words():
    bi = jaxlstm.init_stack(jax.random.key(0), I, H, num_layers=1, bidirectional=True)
    with pytest.raises(ValueError, match="streaming needs unidirectional layers"):
        jaxlstm.Stepper.for_stack(bi, batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive int; received 0"):
        jaxlstm.Stepper.for_stack(_stack(), batch_size=0)
    with pytest.raises(ValueError, match="streams on axis 0 with one size"):
        jaxlstm.Stepper(lambda s, x: (s, x), (jnp.zeros((2, 3)), jnp.zeros((3, 3))))
