"""Sequence losses against NumPy."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlstm import training

pytestmark = pytest.mark.usefixtures("peer_promotion")  # optax and orbax run here too


# ------------------------------------------------------------------ losses


def test_sequence_cross_entropy_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7))
    targets = rng.integers(0, 7, size=(3, 5))
    lengths = np.array([5, 2, 0])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    valid = np.arange(5)[None] < lengths[:, None]
    expected = -(picked * valid).sum() / valid.sum()
    got = training.sequence_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), seq_lengths=jnp.asarray(lengths))
    np.testing.assert_allclose(got, expected, rtol=1e-6)  # computed in float32
    np.testing.assert_allclose(training.to_bits(got), expected / math.log(2), rtol=1e-6)
    with_mask = training.sequence_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), mask=jnp.asarray(valid))
    np.testing.assert_allclose(with_mask, got, rtol=1e-7)


def test_masked_mse_against_numpy():
    rng = np.random.default_rng(1)
    p, t = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 3))
    valid = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
    expected = (((p - t) ** 2).mean(-1) * valid).sum() / valid.sum()
    np.testing.assert_allclose(training.masked_mse(p, t, seq_lengths=jnp.array([3, 1])), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="mask must have shape"):
        training.masked_mse(p, t, mask=jnp.ones((2, 3)))
