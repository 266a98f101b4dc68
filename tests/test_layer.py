"""One layer over a sequence (jaxlstm.lstm) against the independent NumPy reference (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm
from tests.helpers.problems import ATOL, RTOL, SHAPES, make
from tests.helpers.reference import run_batch, run_sequence


@pytest.mark.parametrize("seed_cell", [True, False], ids=["seed", "classic"])
@pytest.mark.parametrize("B,T,I,H", SHAPES)
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_lstm_matches_numpy_reference(seed_cell, B, T, I, H, with_lengths, reverse):
    # Given random seed-notation weights, inputs, a non-zero initial state
    rng, g, xs, c0, a0 = make(B * 100 + T, B, T, I, H, seed_cell)
    lengths = rng.integers(0, T + 1, size=B) if with_lengths else None
    if with_lengths:
        lengths[0] = T  # always one full-length sequence
    p = jaxlstm.params_from_gates(**g)
    # When the library runs the sequence
    hs, final = jaxlstm.lstm(
        p, xs, jaxlstm.LSTMState(c0, a0), seq_lengths=None if lengths is None else jnp.asarray(lengths), reverse=reverse
    )
    # Then outputs and final state equal the reference loop
    ref_h, ref_c, ref_a = run_batch(g, xs, c0, a0, lengths, reverse)
    np.testing.assert_allclose(hs, ref_h, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(final.cell, ref_c, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(final.hidden, ref_a, rtol=RTOL, atol=ATOL)


def test_lengths_zero_returns_initial_state_and_zero_outputs():
    rng, g, xs, c0, a0 = make(3, 2, 4, 3, 2)
    p = jaxlstm.params_from_gates(**g)
    for reverse in (False, True):
        hs, final = jaxlstm.lstm(p, xs, jaxlstm.LSTMState(c0, a0), seq_lengths=jnp.array([0, 0]), reverse=reverse)
        np.testing.assert_array_equal(hs, np.zeros((2, 4, 2)))
        np.testing.assert_array_equal(final.cell, c0)
        np.testing.assert_array_equal(final.hidden, a0)


@pytest.mark.parametrize("reverse", [False, True])
def test_time_major_and_unbatched_layouts(reverse):
    rng, g, xs, c0, a0 = make(4, 3, 6, 2, 5)
    p = jaxlstm.params_from_gates(**g)
    lengths = jnp.array([6, 2, 4])
    hs, final = jaxlstm.lstm(p, xs, jaxlstm.LSTMState(c0, a0), seq_lengths=lengths, reverse=reverse)
    hs_tm, final_tm = jaxlstm.lstm(
        p, np.swapaxes(xs, 0, 1), jaxlstm.LSTMState(c0, a0), seq_lengths=lengths, reverse=reverse, time_major=True
    )
    np.testing.assert_allclose(np.swapaxes(hs_tm, 0, 1), hs, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(final_tm.hidden, final.hidden, rtol=1e-14, atol=1e-14)
    for b in range(3):
        ref_o, ref_c, ref_a = run_sequence(g, xs[b], c0[b], a0[b], int(lengths[b]), reverse)
        h1, f1 = jaxlstm.lstm(
            p, xs[b], jaxlstm.LSTMState(c0[b], a0[b]), seq_lengths=jnp.asarray(lengths[b]), reverse=reverse
        )
        assert h1.shape == (6, 5)
        np.testing.assert_allclose(h1, ref_o, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(f1.cell, ref_c, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("seed_cell", [True, False], ids=["seed", "classic"])
def test_lstm_equals_python_loop_of_steps(seed_cell):
    rng, g, xs, c0, a0 = make(5, 2, 9, 4, 3, seed_cell)
    p = jaxlstm.params_from_gates(**g)
    state = jaxlstm.LSTMState(jnp.asarray(c0), jnp.asarray(a0))
    outs = []
    for t in range(xs.shape[1]):
        state, y = jaxlstm.lstm_step(p, state, xs[:, t])
        outs.append(y)
    hs, final = jaxlstm.lstm(p, xs, jaxlstm.LSTMState(c0, a0))
    np.testing.assert_allclose(hs, np.stack(outs, axis=1), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(final.cell, state.cell, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("unroll", [1, 3, True])
def test_unroll_does_not_change_results(unroll):
    rng, g, xs, c0, a0 = make(6, 2, 7, 3, 4)
    p = jaxlstm.params_from_gates(**g)
    ref_h, _, _ = run_batch(g, xs, c0, a0, [7, 3])
    hs, _ = jaxlstm.lstm(p, xs, jaxlstm.LSTMState(c0, a0), seq_lengths=jnp.array([7, 3]), unroll=unroll)
    np.testing.assert_allclose(hs, ref_h, rtol=RTOL, atol=ATOL)

    # the fused backward pass (whose loop is never unrolled) against autodiff through the unrolled scan
    def loss(p, xs, bptt):
        hs, final = jaxlstm.lstm(
            p, xs, jaxlstm.LSTMState(c0, a0), seq_lengths=jnp.array([7, 3]), unroll=unroll, bptt=bptt
        )
        return jnp.sum(jnp.sin(hs)) + jnp.sum(final.cell**2)

    got = jax.grad(loss, argnums=(0, 1))(p, xs, "custom")
    want = jax.grad(loss, argnums=(0, 1))(p, xs, "autodiff")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_float32_matches_reference_at_float32_tolerance():
    rng, g, xs, c0, a0 = make(7, 4, 20, 8, 16)
    g32 = {k: None if v is None else v.astype(np.float32) for k, v in g.items()}
    p = jaxlstm.params_from_gates(**g32)
    hs, _ = jaxlstm.lstm(p, xs.astype(np.float32), jaxlstm.LSTMState(c0.astype(np.float32), a0.astype(np.float32)))
    assert hs.dtype == jnp.float32
    ref_h, _, _ = run_batch(g, xs.astype(np.float32).astype(np.float64), c0, a0)
    np.testing.assert_allclose(hs, ref_h, rtol=1e-4, atol=1e-5)


def test_zero_state_default_equals_explicit_zeros():
    rng, g, xs, _, _ = make(8, 2, 4, 3, 2)
    p = jaxlstm.params_from_gates(**g)
    hs, _ = jaxlstm.lstm(p, xs)
    ref_h, _, _ = run_batch(g, xs, np.zeros((2, 2)), np.zeros((2, 2)))
    np.testing.assert_allclose(hs, ref_h, rtol=RTOL, atol=ATOL)
    z = jaxlstm.zero_state(p, (2,))
    assert z.cell.dtype == jnp.float64 and z.cell.shape == (2, 2)


MASKS = {  # (B, T) = (3, 7): each pattern on one row, a full row and an empty row beside it
    "left": [[0, 0, 0, 1, 1, 1, 1], [1] * 7, [0] * 7],
    "holes": [[1, 0, 1, 1, 0, 0, 1], [0, 1, 1, 0, 1, 1, 0], [1] * 7],
    "right": [[1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0], [0] * 7],
}


@pytest.mark.parametrize("seed_cell", [True, False], ids=["seed", "classic"])
@pytest.mark.parametrize("pattern", sorted(MASKS))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("time_major", [False, True], ids=["batch_major", "time_major"])
def test_mask_matches_numpy_reference(seed_cell, pattern, reverse, time_major):
    rng, g, xs, c0, a0 = make(11, 3, 7, 3, 4, seed_cell)
    valid = np.array(MASKS[pattern], bool)
    xs = xs.copy()
    xs[~valid] = np.nan  # whatever a masked step holds never reaches the results
    p = jaxlstm.params_from_gates(**g)
    x_in, m_in = (np.swapaxes(xs, 0, 1), valid.T) if time_major else (xs, valid)
    hs, final = jaxlstm.lstm(
        p, x_in, jaxlstm.LSTMState(c0, a0), mask=jnp.asarray(m_in), reverse=reverse, time_major=time_major
    )
    if time_major:
        hs = np.swapaxes(hs, 0, 1)
    ref_h, ref_c, ref_a = run_batch(g, np.nan_to_num(xs), c0, a0, reverse=reverse, valid=valid)
    np.testing.assert_allclose(hs, ref_h, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(final.cell, ref_c, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(final.hidden, ref_a, rtol=RTOL, atol=ATOL)


def test_mask_equals_seq_lengths_where_they_coincide_and_both_combine():
    rng, g, xs, c0, a0 = make(12, 3, 6, 2, 3)
    p = jaxlstm.params_from_gates(**g)
    lengths = np.array([6, 2, 0])
    prefix = np.arange(6)[None] < lengths[:, None]
    s0 = jaxlstm.LSTMState(c0, a0)
    for reverse in (False, True):
        by_len = jaxlstm.lstm(p, xs, s0, seq_lengths=jnp.asarray(lengths), reverse=reverse)
        by_mask = jaxlstm.lstm(p, xs, s0, mask=jnp.asarray(prefix), reverse=reverse)
        both = jaxlstm.lstm(p, xs, s0, mask=jnp.asarray(prefix), seq_lengths=jnp.asarray(lengths), reverse=reverse)
        for other in (by_mask, both):
            for a, b in zip(jax.tree.leaves(by_len), jax.tree.leaves(other)):
                np.testing.assert_array_equal(a, b)
    # a hole inside the lengths: both apply
    holes = prefix.copy()
    holes[0, 1] = False
    hs, _ = jaxlstm.lstm(p, xs, s0, mask=jnp.asarray(holes), seq_lengths=jnp.asarray(lengths))
    ref_h, _, _ = run_batch(g, xs, c0, a0, lengths, valid=holes)
    np.testing.assert_allclose(hs, ref_h, rtol=RTOL, atol=ATOL)


def test_mask_is_checked():
    rng, g, xs, c0, a0 = make(13, 2, 5, 3, 2)
    p = jaxlstm.params_from_gates(**g)
    ok = np.ones((2, 5), bool)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 5\) \(\(B, T\).*received shape \(5, 2\)"):
        jaxlstm.lstm(p, xs, mask=ok.T)
    with pytest.raises(ValueError, match=r"mask must have shape \(5, 2\) \(\(T, B\) since time_major"):
        jaxlstm.lstm(p, np.swapaxes(xs, 0, 1), mask=ok, time_major=True)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 5\).*never broadcast"):
        jaxlstm.lstm(p, xs, mask=ok[:1])
    with pytest.raises(TypeError, match=r"mask must be boolean.*float64.*mask != 0"):
        jaxlstm.lstm(p, xs, mask=ok.astype(np.float64))
    with pytest.raises(ValueError, match=r"mask and seq_lengths disagree: mask marks step 3 of sequence 1 valid"):
        jaxlstm.lstm(p, xs, mask=ok, seq_lengths=jnp.array([5, 3]))
    with pytest.raises(ValueError, match=r"mask must have shape \(5,\) \(\(T,\) for one unbatched"):
        jaxlstm.lstm(p, xs[0], mask=ok)
