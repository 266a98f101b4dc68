"""The character-LM job's sampling filters against a NumPy reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlstm.app.charlm import RunError, check_sampling, filter_logits


def reference(logits, temperature, top_k, top_p):
    z = np.asarray(logits, np.float64) / temperature
    keep = np.ones_like(z, bool)
    order = np.argsort(-z)
    if top_k is not None:
        keep[order[top_k:]] = False
    p = np.exp(z - z.max())
    p /= p.sum()
    mass = 0.0
    for rank, i in enumerate(order):  # the smallest set of most likely tokens holding top_p
        if mass >= top_p:
            keep[order[rank:]] = False
            break
        mass += p[i]
    return np.where(keep, z, -np.inf)


@pytest.mark.parametrize("top_k,top_p", [(None, 1.0), (3, 1.0), (None, 0.5), (4, 0.8), (1, 1.0), (None, 1e-6)])
def test_filter_logits_matches_reference(top_k, top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=10) * 2
    got = np.asarray(filter_logits(jnp.asarray(logits), 0.7, top_k, top_p))
    np.testing.assert_allclose(got, reference(logits, 0.7, top_k, top_p), rtol=1e-12)
    kept = np.isfinite(got).sum()
    assert kept >= 1 and (top_k is None or kept <= top_k)


@pytest.mark.parametrize(
    "args,match",
    [
        ((-1.0, None, 1.0, 1), "--temperature must be a finite number >= 0"),
        ((float("nan"), None, 1.0, 1), "--temperature"),
        ((1.0, 0, 1.0, 1), "--top-k must be a positive integer"),
        ((1.0, None, 0.0, 1), r"--top-p must lie in \(0, 1\]"),
        ((1.0, None, 1.0, 0), "--num-samples must be a positive integer"),
    ],
)
def test_sampling_options_are_checked(args, match):
    with pytest.raises(RunError, match=match):
        check_sampling(*args)
