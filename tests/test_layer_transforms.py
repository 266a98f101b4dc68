"""Gradients and composition with jit / vmap / grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxlstm
from tests.helpers.reference import random_gates, run_batch


def setup(seed=0, B=2, T=4, I=3, H=2, seed_cell=True):
    rng = np.random.default_rng(seed)
    g = random_gates(rng, I, H, seed_cell=seed_cell)
    p = jaxlstm.params_from_gates(**g)
    xs = jnp.asarray(rng.normal(size=(B, T, I)))
    s0 = jaxlstm.LSTMState(jnp.asarray(rng.normal(size=(B, H))), jnp.asarray(np.tanh(rng.normal(size=(B, H)))))
    return g, p, xs, s0


@pytest.mark.parametrize("seed_cell", [True, False], ids=["seed", "classic"])
@pytest.mark.parametrize("lengths", [None, (4, 2)], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bptt", ["custom", "autodiff"])
def test_check_grads(seed_cell, lengths, reverse, bptt):
    _, p, xs, s0 = setup(seed_cell=seed_cell)
    sl = None if lengths is None else jnp.asarray(lengths)

    def f(p, xs, s0):
        hs, final = jaxlstm.lstm(p, xs, s0, seq_lengths=sl, reverse=reverse, bptt=bptt)
        return jnp.sum(hs**2) + jnp.sum(final.cell * final.hidden)

    # the custom backward is reverse-mode only; forward mode goes through autodiff
    modes = ("rev",) if bptt == "custom" else ("fwd", "rev")
    check_grads(f, (p, xs, s0), order=1, modes=modes, atol=1e-6, rtol=1e-6)


@pytest.mark.slow  # many compilations: the slow tier (CI)
def test_second_order_grads():
    _, p, xs, s0 = setup(T=3)

    def f(p):
        hs, final = jaxlstm.lstm(p, xs, s0, seq_lengths=jnp.array([3, 2]))
        return jnp.sum(hs**2) + jnp.sum(final.cell)

    check_grads(f, (p,), order=2, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_grad_matches_finite_differences_of_numpy_reference():
    # independent of JAX autodiff: central differences of the NumPy reference
    g, p, xs, s0 = setup(seed=3)
    c0, a0 = np.asarray(s0.cell), np.asarray(s0.hidden)
    xs_np = np.asarray(xs)

    def loss_ref(gates):
        out, c, a = run_batch(gates, xs_np, c0, a0, [4, 3])
        return np.sum(out**2) + np.sum(c)

    def loss(p):
        hs, final = jaxlstm.lstm(p, xs, s0, seq_lengths=jnp.array([4, 3]))
        return jnp.sum(hs**2) + jnp.sum(final.cell)

    grads = jax.grad(loss)(p).gates()
    eps = 1e-6
    for name in ("W_f1", "W_i", "W_o", "b_f3"):
        num = np.zeros_like(g[name])
        for idx in np.ndindex(g[name].shape):
            gp = {k: (None if v is None else v.copy()) for k, v in g.items()}
            gm = {k: (None if v is None else v.copy()) for k, v in g.items()}
            gp[name][idx] += eps
            gm[name][idx] -= eps
            num[idx] = (loss_ref(gp) - loss_ref(gm)) / (2 * eps)
        np.testing.assert_allclose(grads[name], num, rtol=1e-6, atol=1e-8)


def test_jit_with_static_options_and_no_recompilation():
    _, p, xs, s0 = setup()
    traces = []

    @jax.jit
    def run(p, xs, lengths):
        traces.append(1)
        return jaxlstm.lstm(p, xs, seq_lengths=lengths, reverse=True)[0]

    a = run(p, xs, jnp.array([4, 1]))
    b = run(jax.tree.map(lambda w: w * 0.5, p), xs + 1.0, jnp.array([2, 3]))
    assert len(traces) == 1
    assert a.shape == b.shape == (2, 4, 2)
    # the library's own compiled entry point is cached across calls too
    jaxlstm.lstm(p, xs)
    size = jaxlstm._layer._lstm_jit._cache_size()
    jaxlstm.lstm(jax.tree.map(lambda w: w + 1.0, p), xs * 2.0)
    assert jaxlstm._layer._lstm_jit._cache_size() == size


def test_vmap_over_parameter_sets():
    rng = np.random.default_rng(4)
    gs = [random_gates(rng, 3, 2) for _ in range(3)]
    ps = [jaxlstm.params_from_gates(**g) for g in gs]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *ps)
    xs = jnp.asarray(rng.normal(size=(2, 5, 3)))
    hs = jax.vmap(lambda p: jaxlstm.lstm(p, xs)[0])(stacked)
    assert hs.shape == (3, 2, 5, 2)
    for k, g in enumerate(gs):
        ref, _, _ = run_batch(g, np.asarray(xs), np.zeros((2, 2)), np.zeros((2, 2)))
        np.testing.assert_allclose(hs[k], ref, rtol=1e-12, atol=1e-12)


def test_vmap_over_unbatched_sequences_equals_batched():
    _, p, xs, s0 = setup(B=3)
    lengths = jnp.array([4, 0, 2])
    hs_v, fin_v = jax.vmap(lambda x, s, L: jaxlstm.lstm(p, x, s, seq_lengths=L))(xs, s0, lengths)
    hs_b, fin_b = jaxlstm.lstm(p, xs, s0, seq_lengths=lengths)
    np.testing.assert_allclose(hs_v, hs_b, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(fin_v.cell, fin_b.cell, rtol=1e-13, atol=1e-13)


def test_grad_wrt_initial_state_and_inputs_under_jit():
    _, p, xs, s0 = setup()

    @jax.jit
    def loss(xs, s0):
        return jnp.sum(jaxlstm.lstm(p, xs, s0)[0])

    gx, gs = jax.grad(loss, argnums=(0, 1))(xs, s0)
    assert gx.shape == xs.shape and gs.cell.shape == s0.cell.shape
    eps = 1e-6
    d = np.zeros(s0.cell.shape)
    d[1, 0] = eps
    num = (loss(xs, s0._replace(cell=s0.cell + d)) - loss(xs, s0._replace(cell=s0.cell - d))) / (2 * eps)
    np.testing.assert_allclose(gs.cell[1, 0], num, rtol=1e-6)
