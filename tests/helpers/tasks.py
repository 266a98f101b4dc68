"""Small tasks shared by the module tests."""

import jax.numpy as jnp
import numpy as np


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
