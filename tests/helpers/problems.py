"""Random problems in the seed's per-gate notation, shared by the gate, cell and layer tests."""

import numpy as np

from tests.helpers.reference import random_gates

RTOL = 1e-12
ATOL = 1e-12

SHAPES = [  # (B, T, I, H)
    (1, 1, 3, 4),
    (1, 6, 2, 2),
    (2, 5, 3, 4),
    (3, 7, 6, 2),
]


def make(seed, B, T, I, H, seed_cell=True, scale=0.5):
    """``scale``: the weights' standard deviation (smaller for large ``H``, to keep the gates unsaturated)."""
    rng = np.random.default_rng(seed)
    g = random_gates(rng, I, H, seed_cell=seed_cell, scale=scale)
    xs = rng.normal(size=(B, T, I))
    c0 = rng.normal(size=(B, H)) * 0.5
    a0 = np.tanh(rng.normal(size=(B, H)))
    return rng, g, xs, c0, a0
