"""The mixed-precision policy: half-precision compute, float32 state and sums (jaxlstm/_precision.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm

T_LONG = 1000


def long_problem(seed_cell):
    p32 = jaxlstm.init_params(jax.random.key(0), 16, 64, output_transform=seed_cell)
    xs = jax.random.normal(jax.random.key(1), (4, T_LONG, 16))
    return p32, jax.tree.map(lambda a: a.astype(jnp.bfloat16), p32), xs


@pytest.mark.slow  # trains or runs a peer: the slow tier (CI)
@pytest.mark.parametrize("seed_cell", [True, False], ids=["output_map", "classic"])
def test_bfloat16_error_does_not_grow_with_time(seed_cell):
    """bf16 compute against float32 on the same (bf16-representable) weights over T = 1000.

    Stated bound: the error of the outputs stays below 1e-2 at every step, and its mean over
    the last 100 steps is at most twice its mean over steps 10-100 (it does not compound).
    """
    with jax.enable_x64(False):
        p32, p16, xs = long_problem(seed_cell)
        p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p16)  # the same weights, exactly
        xs16 = xs.astype(jnp.bfloat16)
        h32, f32 = jaxlstm.lstm(p32, xs16.astype(jnp.float32))
        h16, f16 = jaxlstm.lstm(p16, xs16)
        assert h16.dtype == jnp.bfloat16 and f16.cell.dtype == f16.hidden.dtype == jnp.float32
        err = np.abs(np.asarray(h16, np.float32) - np.asarray(h32))
        assert err.max() < 1e-2, err.max()
        early, late = err[:, 10:100].mean(), err[:, -100:].mean()
        assert late <= 2 * early + 1e-4, (early, late)
        np.testing.assert_allclose(f16.cell, f32.cell, atol=2e-2)


@pytest.mark.slow  # trains or runs a peer: the slow tier (CI)
@pytest.mark.parametrize("bptt,checkpoint_every", [("custom", None), ("custom", 64), ("autodiff", None)])
def test_bfloat16_gradients_summed_in_float32(bptt, checkpoint_every):
    """Weight gradients over 1000 steps: within 2% (relative to the largest entry) of float32's.

    Summing the per-step weight gradients in bfloat16 (what plain autodiff would do) is off by
    tens of percent here; the policy keeps every sum in float32 on each path.
    """
    with jax.enable_x64(False):
        p32, p16, xs = long_problem(True)
        p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p16)
        xs16 = xs.astype(jnp.bfloat16)

        def loss(p, x):
            hs, final = jaxlstm.lstm(p, x, bptt=bptt, checkpoint_every=checkpoint_every)
            return jnp.sum(hs.astype(jnp.float32) ** 2) + jnp.sum(final.cell)

        g32 = jax.grad(loss)(p32, xs16.astype(jnp.float32))
        g16 = jax.grad(loss)(p16, xs16)
        for name, a, b in ((n, a, b) for n, a, b in zip(jaxlstm.LSTMParams._fields, g16, g32) if a is not None):
            assert a.dtype == jnp.bfloat16, name
            scale = float(jnp.abs(b).max())
            assert float(jnp.abs(a.astype(jnp.float32) - b).max()) <= 2e-2 * scale, name


def test_half_precision_state_dtype_and_its_check():
    p = jaxlstm.init_params(jax.random.key(0), 3, 4, dtype=jnp.bfloat16)
    assert jaxlstm.zero_state(p, (2,)).cell.dtype == jnp.float32
    xs = jnp.ones((2, 5, 3), jnp.bfloat16)
    _, final = jaxlstm.lstm(p, xs)
    ys, again = jaxlstm.lstm(p, xs, final)  # the returned state goes back in
    assert again.hidden.dtype == jnp.float32 and ys.dtype == jnp.bfloat16
    bad = jax.tree.map(lambda a: a.astype(jnp.bfloat16), final)
    with pytest.raises(
        TypeError, match=r"state.cell has dtype bfloat16; a layer with bfloat16 params keeps its state in float32"
    ):
        jaxlstm.lstm(p, xs, bad)
    state, y = jaxlstm.lstm_step(p, final, xs[:, 0])
    assert state.cell.dtype == jnp.float32 and y.dtype == jnp.bfloat16
    # float32 and float64 keep their own dtype for everything
    p64 = jaxlstm.init_params(jax.random.key(0), 3, 4, dtype=jnp.float64)
    assert jaxlstm.lstm(p64, jnp.ones((2, 5, 3)))[1].cell.dtype == jnp.float64


_DOT = re.compile(r"stablehlo\.dot_general .*: \((tensor<[^)]*>), (tensor<[^)]*>)\) -> tensor<([^>]*)>")


def _dot_types(fn, *args) -> list[tuple[str, str, str]]:
    """(lhs element type, rhs element type, result element type) of every dot in ``fn``'s program."""
    text = jax.jit(fn).lower(*args).as_text()
    found = []
    for lhs, rhs, out in _DOT.findall(text):
        found.append((lhs.rsplit("x", 1)[-1].rstrip(">"), rhs.rsplit("x", 1)[-1].rstrip(">"), out.rsplit("x", 1)[-1]))
    return found


@pytest.mark.parametrize("seed_cell", [True, False], ids=["output_map", "classic"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_matmuls_accumulate_in_float32(seed_cell, dtype):
    """Every dot with half-precision operands yields float32 (``preferred_element_type``), forward and
    backward: a product rounded to the half dtype and then widened would show as a half-precision result."""
    with jax.enable_x64(False):
        p = jaxlstm.init_params(jax.random.key(0), 3, 8, output_transform=seed_cell, dtype=dtype)
        xs = jnp.ones((2, 5, 3), dtype)

        def loss(p, x):
            return jnp.sum(jaxlstm.lstm(p, x)[0].astype(jnp.float32) ** 2)

        for fn in (
            lambda p, x: jaxlstm.lstm(p, x),
            jax.grad(loss),
            lambda p, x: jaxlstm.lstm_step(p, jaxlstm.zero_state(p, (2,)), x[:, 0]),
        ):
            types = _dot_types(fn, p, xs)
            short = {"bfloat16": "bf16", "float16": "f16"}[jnp.dtype(dtype).name]
            half = [t for t in types if short in (t[0], t[1])]
            assert half, types  # the program multiplies in the half dtype at all
            assert all(out == "f32" for _, _, out in half), half
