"""The gate functions against the independent NumPy reference (float64)."""

import numpy as np
import pytest

import jaxlstm
from tests.helpers.problems import ATOL, RTOL, make
from tests.helpers.reference import gate_values


@pytest.mark.parametrize("seed_cell", [True, False], ids=["seed", "classic"])
def test_gate_functions_match_formulas(seed_cell):
    # Given per-gate weights and a batch of (a, x, c)
    rng, g, xs, c0, a0 = make(0, 3, 1, 5, 4, seed_cell)
    p = jaxlstm.params_from_gates(**g)
    x = xs[:, 0]
    # When each gate is evaluated by the library
    f1 = jaxlstm.forget_gate(p, a0, x)
    gi = jaxlstm.input_gate(p, a0, x)
    c_new = f1 * c0 + gi
    go = jaxlstm.output_gate(p, c_new, a0, x)
    # Then each equals its formula, for every batch element
    for b in range(3):
        ref_f1, ref_i, ref_c, ref_o = gate_values(g, a0[b], x[b], c0[b])
        np.testing.assert_allclose(f1[b], ref_f1, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(gi[b], ref_i, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(c_new[b], ref_c, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(go[b], ref_o, rtol=RTOL, atol=ATOL)


def test_gate_functions_any_leading_batch_dims():
    rng, g, _, _, _ = make(1, 1, 1, 3, 2)
    p = jaxlstm.params_from_gates(**g)
    a = rng.normal(size=(2, 3, 2))
    x = rng.normal(size=(2, 3, 3))
    c = rng.normal(size=(2, 3, 2))
    out = jaxlstm.output_gate(p, c, a, x)
    assert out.shape == (2, 3, 2)
    for i in range(2):
        for j in range(3):
            ax = np.concatenate([a[i, j], x[i, j]])
            ref = np.tanh(g["W_o"] @ c[i, j] + g["b_o"]) / (1 + np.exp(-(g["W_f3"] @ ax + g["b_f3"])))
            np.testing.assert_allclose(out[i, j], ref, rtol=RTOL, atol=ATOL)
