"""The fused cell step: the composition of the three gates."""

import numpy as np
import pytest

import jaxlstm
from tests.helpers.problems import make


@pytest.mark.parametrize("seed_cell", [True, False], ids=["seed", "classic"])
def test_step_is_composition_of_gates(seed_cell):
    rng, g, xs, c0, a0 = make(2, 4, 1, 3, 5, seed_cell)
    p = jaxlstm.params_from_gates(**g)
    x = xs[:, 0]
    state, y = jaxlstm.lstm_step(p, jaxlstm.LSTMState(c0, a0), x)
    c_ref = jaxlstm.forget_gate(p, a0, x) * c0 + jaxlstm.input_gate(p, a0, x)
    a_ref = jaxlstm.output_gate(p, c_ref, a0, x)
    np.testing.assert_allclose(state.cell, c_ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(state.hidden, a_ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(y, state.hidden)
