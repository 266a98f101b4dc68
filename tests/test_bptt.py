"""The hand-written backward pass against autodiff through a plain scan."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm
from tests.helpers.reference import random_gates


def problem(seed, B, T, I, H, seed_cell, dtype):
    rng = np.random.default_rng(seed)
    g = {k: None if v is None else v.astype(dtype) for k, v in random_gates(rng, I, H, seed_cell=seed_cell).items()}
    p = jaxlstm.params_from_gates(**g)
    shape = (T, I) if B is None else (B, T, I)
    bshape = () if B is None else (B,)
    xs = jnp.asarray(rng.normal(size=shape), dtype)
    s0 = jaxlstm.LSTMState(
        jnp.asarray(rng.normal(size=bshape + (H,)), dtype), jnp.asarray(rng.normal(size=bshape + (H,)) * 0.5, dtype)
    )
    w_out = jnp.asarray(rng.normal(size=shape[:-1] + (H,)), dtype)
    w_c = jnp.asarray(rng.normal(size=bshape + (H,)), dtype)
    return p, xs, s0, w_out, w_c, rng


def grads_of(p, xs, s0, w_out, w_c, **kw):
    def loss(p, xs, s0):
        hs, final = jaxlstm.lstm(p, xs, s0, **kw)
        return jnp.sum(hs * w_out) + jnp.sum(final.cell * w_c) + jnp.sum(final.hidden**2)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(p, xs, s0)


def assert_trees_close(a, b, rtol, atol=0.0):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        # relative to the largest entry of each gradient array
        scale = float(np.max(np.abs(np.asarray(y)))) or 1.0
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=rtol * scale + atol)


CASES = [  # (B, T, I, H)
    (3, 7, 4, 5),
    (1, 1, 2, 3),
    (None, 6, 3, 2),
]


# Every combination of the four two-way options (cell, lengths, direction, chunking), each with
# one of the shapes in turn: all pairs of options meet, and every shape meets every option value.
COVER = [
    (seed_cell, *CASES[k % len(CASES)], with_lengths, reverse, checkpoint_every)
    for k, (seed_cell, with_lengths, reverse, checkpoint_every) in enumerate(
        itertools.product([True, False], [False, True], [False, True], [None, 3])
    )
]


def _cover_id(case):
    seed_cell, B, T, I, H, with_lengths, reverse, checkpoint_every = case
    return "-".join(
        [
            "seed" if seed_cell else "classic",
            f"B{B}T{T}I{I}H{H}",
            "lengths" if with_lengths else "full",
            "rev" if reverse else "fwd",
            "chunked" if checkpoint_every else "saved",
        ]
    )


@pytest.mark.parametrize("seed_cell,B,T,I,H,with_lengths,reverse,checkpoint_every", COVER, ids=map(_cover_id, COVER))
def test_fused_matches_autodiff_float64(seed_cell, B, T, I, H, with_lengths, reverse, checkpoint_every):
    p, xs, s0, w_out, w_c, rng = problem(T * 10 + H, B, T, I, H, seed_cell, np.float64)
    lengths = None
    if with_lengths:
        lengths = jnp.asarray(rng.integers(0, T + 1, size=() if B is None else (B,)), jnp.int32)
    kw = dict(seq_lengths=lengths, reverse=reverse)
    v_ref, g_ref = grads_of(p, xs, s0, w_out, w_c, bptt="autodiff", **kw)
    v, g = grads_of(p, xs, s0, w_out, w_c, bptt="custom", checkpoint_every=checkpoint_every, **kw)
    np.testing.assert_allclose(v, v_ref, rtol=1e-12)
    assert_trees_close(g, g_ref, rtol=1e-10)
    assert jax.tree.structure(g[0]) == jax.tree.structure(p)


@pytest.mark.parametrize("seed_cell", [True, False], ids=["seed", "classic"])
@pytest.mark.parametrize("checkpoint_every", [None, 16], ids=["saved", "chunked"])
def test_fused_matches_autodiff_float32(seed_cell, checkpoint_every):
    p, xs, s0, w_out, w_c, rng = problem(1, 8, 50, 16, 32, seed_cell, np.float32)
    lengths = jnp.asarray(rng.integers(20, 51, size=8), jnp.int32)
    _, g_ref = grads_of(p, xs, s0, w_out, w_c, bptt="autodiff", seq_lengths=lengths)
    _, g = grads_of(p, xs, s0, w_out, w_c, seq_lengths=lengths, checkpoint_every=checkpoint_every)
    assert_trees_close(g, g_ref, rtol=1e-5)


def test_time_major_fused_matches_autodiff():
    p, xs, s0, w_out, w_c, rng = problem(2, 3, 9, 2, 4, True, np.float64)
    xs_tm, w_tm = jnp.swapaxes(xs, 0, 1), jnp.swapaxes(w_out, 0, 1)
    kw = dict(seq_lengths=jnp.array([9, 4, 0]), time_major=True, reverse=True)
    _, g_ref = grads_of(p, xs_tm, s0, w_tm, w_c, bptt="autodiff", **kw)
    _, g = grads_of(p, xs_tm, s0, w_tm, w_c, **kw)
    assert_trees_close(g, g_ref, rtol=1e-10)


def test_checkpoint_every_gives_identical_outputs():
    p, xs, s0, *_ = problem(3, 2, 10, 3, 4, True, np.float64)
    ref_h, ref_f = jaxlstm.lstm(p, xs, s0, seq_lengths=jnp.array([10, 7]))
    for k in (1, 3, 4, 10, 32):
        h, f = jaxlstm.lstm(p, xs, s0, seq_lengths=jnp.array([10, 7]), checkpoint_every=k)
        np.testing.assert_allclose(h, ref_h, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(f.cell, ref_f.cell, rtol=1e-14, atol=1e-15)


def test_forward_mode_needs_autodiff_option():
    p, xs, s0, *_ = problem(4, 2, 4, 3, 2, True, np.float64)
    f = lambda x: jnp.sum(jaxlstm.lstm(p, x, s0, bptt="autodiff")[0])
    primal, tangent = jax.jvp(f, (xs,), (jnp.ones_like(xs),))
    g = jax.grad(lambda x: jnp.sum(jaxlstm.lstm(p, x, s0)[0]))(xs)
    np.testing.assert_allclose(tangent, jnp.sum(g), rtol=1e-10)
    hess = jax.hessian(lambda b: jnp.sum(jaxlstm.lstm(p._replace(b=b), xs, s0, bptt="autodiff")[0]))(p.b)
    assert hess.shape == (8, 8)


@pytest.mark.slow  # many compilations: the slow tier (CI)
def test_reverse_over_reverse_through_fused():
    p, xs, s0, *_ = problem(5, 2, 4, 3, 2, False, np.float64)

    def grad_norm(bptt):
        g = jax.grad(lambda p: jnp.sum(jaxlstm.lstm(p, xs, s0, bptt=bptt)[0] ** 2))
        return jax.grad(lambda p: sum(jnp.sum(a**2) for a in jax.tree.leaves(g(p))))(p)

    assert_trees_close(grad_norm("custom"), grad_norm("autodiff"), rtol=1e-9)


def test_bad_bptt_options():
    p, xs, *_ = problem(6, 2, 4, 3, 2, True, np.float64)
    with pytest.raises(ValueError, match="bptt must be one of"):
        jaxlstm.lstm(p, xs, bptt="cudnn")
    with pytest.raises(ValueError, match="checkpoint_every must be None or a positive int"):
        jaxlstm.lstm(p, xs, checkpoint_every=0)


@pytest.mark.parametrize("checkpoint_every", [None, 2])
@pytest.mark.parametrize("reverse", [False, True])
def test_recurrent_mask_forward_and_gradients(checkpoint_every, reverse):
    # Given a per-sequence mask on a^{t-1}
    p, xs, s0, w_out, w_c, rng = problem(7, 3, 5, 2, 4, True, np.float64)
    mask = jnp.asarray(rng.integers(0, 2, size=(3, 4)) * 2.0)
    lengths = jnp.array([5, 3, 1])
    # Then the forward equals stepping by hand with the masked hidden state
    state = s0
    order = range(4, -1, -1) if reverse else range(5)
    hs_ref = np.zeros((3, 5, 4))
    for t in order:
        # the cell update uses the masked hidden only inside the gates; the carried cell is unmasked
        c = jaxlstm.forget_gate(p, state.hidden * mask, xs[:, t]) * state.cell + jaxlstm.input_gate(
            p, state.hidden * mask, xs[:, t]
        )
        a = jaxlstm.output_gate(p, c, state.hidden * mask, xs[:, t])
        valid = (t < lengths)[:, None]
        state = jaxlstm.LSTMState(jnp.where(valid, c, state.cell), jnp.where(valid, a, state.hidden))
        hs_ref[:, t] = np.where(valid, a, 0.0)
    kw = dict(seq_lengths=lengths, reverse=reverse, recurrent_mask=mask)
    hs, final = jaxlstm.lstm(p, xs, s0, checkpoint_every=checkpoint_every, **kw)
    np.testing.assert_allclose(hs, hs_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(final.cell, state.cell, rtol=1e-12, atol=1e-12)
    # and the fused gradients equal autodiff's
    _, g_ref = grads_of(p, xs, s0, w_out, w_c, bptt="autodiff", **kw)
    _, g = grads_of(p, xs, s0, w_out, w_c, checkpoint_every=checkpoint_every, **kw)
    assert_trees_close(g, g_ref, rtol=1e-10)


# ------------------------------------------------------------------ padding, empty sequences, traced lengths

BACKWARDS = [
    dict(bptt="custom"),
    dict(bptt="custom", checkpoint_every=2),
    dict(bptt="autodiff"),
    dict(bptt="autodiff", checkpoint_every=3),
]


@pytest.mark.parametrize("kw", BACKWARDS, ids=lambda k: "-".join(str(v) for v in k.values()))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_padding_never_reaches_values_or_gradients(kw, reverse, poison):
    """NaN or inf in the padded steps (t >= L) changes nothing: same values, finite and equal gradients."""
    p, xs, s0, w_out, w_c, _ = problem(3, 3, 7, 2, 4, True, np.float64)
    lengths = jnp.array([7, 4, 0])
    pad = jnp.arange(7)[None, :, None] >= lengths[:, None, None]
    poisoned = jnp.where(pad, jnp.asarray(poison, xs.dtype), xs)
    clean = jnp.where(pad, jnp.zeros((), xs.dtype), xs)
    (v_bad, g_bad) = grads_of(p, poisoned, s0, w_out, w_c, seq_lengths=lengths, reverse=reverse, **kw)
    (v_ok, g_ok) = grads_of(p, clean, s0, w_out, w_c, seq_lengths=lengths, reverse=reverse, **kw)
    assert all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(g_bad))
    np.testing.assert_array_equal(v_bad, v_ok)
    assert_trees_close(g_bad, g_ok, rtol=0.0)
    assert bool((jnp.where(pad, g_bad[1], 0) == 0).all())  # the padding gets no gradient


@pytest.mark.parametrize("kw", BACKWARDS, ids=lambda k: "-".join(str(v) for v in k.values()))
@pytest.mark.parametrize("seed_cell", [True, False])
def test_empty_sequence_gradients(kw, seed_cell):
    """T = 0: no outputs, the state passes through; every backward gives zero weight gradients."""
    p, _, s0, _, w_c, _ = problem(4, 2, 1, 3, 5, seed_cell, np.float64)
    xs = jnp.zeros((2, 0, 3))

    def loss(p, s0):
        hs, final = jaxlstm.lstm(p, xs, s0, **kw)
        return jnp.sum(final.cell * w_c) + jnp.sum(final.hidden) + jnp.sum(hs)

    gp, gs = jax.grad(loss, argnums=(0, 1))(p, s0)
    assert all(bool((a == 0).all()) for a in jax.tree.leaves(gp))
    np.testing.assert_array_equal(gs.cell, w_c)
    np.testing.assert_array_equal(gs.hidden, jnp.ones_like(s0.hidden))


@pytest.mark.parametrize("reverse", [False, True])
def test_traced_out_of_range_lengths_are_clamped(reverse):
    """Under jit lengths cannot be checked: they are clamped to [0, T], as documented in jaxlstm.lstm."""
    p, xs, s0, _, _, _ = problem(5, 3, 6, 2, 4, True, np.float64)
    run = jax.jit(lambda L: jaxlstm.lstm(p, xs, s0, seq_lengths=L, reverse=reverse))
    hs_bad, final_bad = run(jnp.array([9, -3, 4]))
    hs_ok, final_ok = jaxlstm.lstm(p, xs, s0, seq_lengths=jnp.array([6, 0, 4]), reverse=reverse)
    # an outer jit compiles the layer into a larger program: equal up to float64 rounding
    np.testing.assert_allclose(hs_bad, hs_ok, rtol=1e-13, atol=1e-15)
    assert_trees_close(final_bad, final_ok, rtol=1e-13)
    with pytest.raises(ValueError, match=r"seq_lengths must lie in \[0, T\]"):  # concrete values are checked
        jaxlstm.lstm(p, xs, s0, seq_lengths=jnp.array([9, -3, 4]))


def test_forward_mode_on_the_fused_backward_names_the_fix():
    p, xs, s0, _, _, _ = problem(6, 2, 3, 2, 3, True, np.float64)
    with pytest.raises(TypeError, match='Pass bptt="autodiff"'):
        jax.jvp(lambda p: jaxlstm.lstm(p, xs)[0], (p,), (p,))
    out, tangent = jax.jvp(lambda p: jaxlstm.lstm(p, xs, bptt="autodiff")[0], (p,), (p,))
    assert tangent.shape == out.shape


@pytest.mark.parametrize("old,new", [("fused", "custom"), ("autodiff", "autodiff")])
def test_old_backward_keyword_still_works_with_a_deprecation_warning(old, new):
    p, xs, s0, *_ = problem(7, 2, 4, 3, 2, True, np.float64)
    with pytest.warns(DeprecationWarning, match=f"use bptt='{new}'"):
        hs_old, _ = jaxlstm.lstm(p, xs, s0, backward=old)
    hs_new, _ = jaxlstm.lstm(p, xs, s0, bptt=new)
    np.testing.assert_array_equal(hs_old, hs_new)
    with pytest.warns(DeprecationWarning):
        jaxlstm.lstm_stack((p,), xs, backward=old)
    with pytest.raises(TypeError, match="give bptt= only"):
        jaxlstm.lstm(p, xs, bptt=new, backward=old)


@pytest.mark.parametrize("seed_cell", [True, False], ids=["seed", "classic"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("checkpoint_every", [None, 3], ids=["saved", "chunked"])
def test_fused_matches_autodiff_with_mask_of_any_pattern(seed_cell, reverse, checkpoint_every):
    p, xs, s0, w_out, w_c, rng = problem(21, 4, 8, 3, 5, seed_cell, np.float64)
    mask = np.array(
        [
            [0, 0, 1, 1, 1, 1, 1, 1],  # left padding
            [1, 0, 1, 1, 0, 0, 1, 0],  # holes
            [1, 1, 1, 0, 0, 0, 0, 0],  # right padding
            [0] * 8,  # nothing valid
        ],
        bool,
    )
    kw = dict(mask=jnp.asarray(mask), reverse=reverse)
    v_ref, g_ref = grads_of(p, xs, s0, w_out, w_c, bptt="autodiff", **kw)
    v, g = grads_of(p, xs, s0, w_out, w_c, bptt="custom", checkpoint_every=checkpoint_every, **kw)
    np.testing.assert_allclose(v, v_ref, rtol=1e-12)
    assert_trees_close(g, g_ref, rtol=1e-10)
    # masked steps get no input gradient; the empty sequence passes its state's gradient straight through
    np.testing.assert_array_equal(np.asarray(g[1])[~mask], 0.0)
    np.testing.assert_allclose(g[2].cell[3], w_c[3], rtol=1e-12)


def test_mask_gradient_matches_finite_differences():
    p, xs, s0, w_out, w_c, rng = problem(22, 2, 6, 2, 3, True, np.float64)
    mask = jnp.asarray(np.array([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 0]], bool))

    def loss(b):
        hs, final = jaxlstm.lstm(p._replace(b=b), xs, s0, mask=mask, reverse=True)
        return jnp.sum(hs * w_out) + jnp.sum(final.cell * w_c)

    g = jax.grad(loss)(p.b)
    eps = 1e-6
    for k in rng.choice(p.b.shape[0], 5, replace=False):
        e = jnp.zeros_like(p.b).at[k].set(eps)
        fd = (loss(p.b + e) - loss(p.b - e)) / (2 * eps)
        np.testing.assert_allclose(g[k], fd, rtol=1e-6, atol=1e-9)
