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
