"""Parameter construction, round trips and initializers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm
from tests.helpers.reference import random_gates


@pytest.mark.parametrize("seed_cell", [True, False])
def test_gates_round_trip_is_exact(seed_cell):
    g = random_gates(np.random.default_rng(0), 3, 5, seed_cell=seed_cell)
    p = jaxlstm.params_from_gates(**g)
    back = p.gates()
    assert set(back) == set(g)
    for k, v in g.items():
        if v is None:
            assert back[k] is None
        else:
            np.testing.assert_array_equal(back[k], v)
    assert p.output_transform is seed_cell
    assert (p.input_size, p.hidden_size) == (3, 5)


def test_fused_layout_places_hidden_part_first():
    # W_f1 acting on [a, x]: a unit on a's first coordinate must reach w_h, not w_x.
    H, I = 2, 3
    zeros = np.zeros((H, H + I))
    W_f1 = zeros.copy()
    W_f1[1, 0] = 7.0  # output unit 1 reads a[0]
    W_f3 = zeros.copy()
    W_f3[0, H + 2] = 5.0  # output unit 0 reads x[2]
    b = np.zeros(H)
    p = jaxlstm.params_from_gates(W_f1, b, zeros, b, zeros, b, W_f3, b)
    a = jnp.array([1.0, 0.0])
    x = jnp.array([0.0, 0.0, 1.0])
    np.testing.assert_allclose(jaxlstm.forget_gate(p, a, x), 1 / (1 + np.exp(-np.array([0.0, 7.0]))), rtol=1e-12)
    f3 = jaxlstm.output_gate(p, jnp.full(H, 10.0), a, x)
    np.testing.assert_allclose(f3, np.tanh(10.0) / (1 + np.exp(-np.array([5.0, 0.0]))), rtol=1e-12)


def test_init_defaults():
    p = jaxlstm.init_params(jax.random.key(0), 6, 4)
    H = 4
    assert p.w_h.dtype == jnp.float32
    np.testing.assert_array_equal(p.b[:H], np.ones(H))  # forget-gate bias 1
    np.testing.assert_array_equal(p.b[H:], np.zeros(3 * H))
    np.testing.assert_array_equal(p.w_o, np.eye(H))
    np.testing.assert_array_equal(p.b_o, np.zeros(H))
    # recurrent blocks are orthogonal
    for k in range(4):
        blk = np.asarray(p.w_h[:, k * H : (k + 1) * H], np.float64)
        np.testing.assert_allclose(blk.T @ blk, np.eye(H), atol=1e-5)
    # Glorot-uniform bound sqrt(6 / (fan_in + fan_out))
    bound = np.sqrt(6 / (6 + 4 * H))
    assert np.abs(np.asarray(p.w_x)).max() <= bound
    assert np.abs(np.asarray(p.w_x)).max() > 0.5 * bound


def test_seed_cell_at_init_equals_classic_cell():
    key = jax.random.key(1)
    seed = jaxlstm.init_params(key, 3, 5)
    classic = seed._replace(w_o=None, b_o=None)
    xs = jax.random.normal(jax.random.key(2), (2, 8, 3), jnp.float32)
    np.testing.assert_allclose(jaxlstm.lstm(seed, xs)[0], jaxlstm.lstm(classic, xs)[0], rtol=1e-6, atol=1e-6)


def test_init_overrides_and_classic():
    p = jaxlstm.init_params(
        jax.random.key(0),
        2,
        3,
        output_transform=False,
        dtype=jnp.float64,
        kernel_init=jax.nn.initializers.zeros,
        forget_bias=0.0,
    )
    assert p.w_o is None and p.b_o is None and not p.output_transform
    assert p.w_x.dtype == jnp.float64
    np.testing.assert_array_equal(p.w_x, 0)
    np.testing.assert_array_equal(p.b, 0)
    q = jaxlstm.init_params(jax.random.key(0), 2, 3, output_init=jax.nn.initializers.orthogonal())
    assert not np.allclose(q.w_o, np.eye(3))


def test_params_are_pytrees():
    p = jaxlstm.init_params(jax.random.key(0), 2, 3)
    leaves = jax.tree.leaves(p)
    assert len(leaves) == 5
    classic = jaxlstm.init_params(jax.random.key(0), 2, 3, output_transform=False)
    assert len(jax.tree.leaves(classic)) == 3
    doubled = jax.tree.map(lambda a: 2 * a, classic)
    assert isinstance(doubled, jaxlstm.LSTMParams) and doubled.w_o is None


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("seed_cell", [True, False])
def test_half_precision_init_is_the_float32_init_rounded(dtype, seed_cell):
    """LAPACK has no half-precision QR: the orthogonal init runs in float32, then the weights are cast."""
    key = jax.random.key(3)
    half = jaxlstm.init_params(key, 5, 8, output_transform=seed_cell, dtype=dtype)
    full = jaxlstm.init_params(key, 5, 8, output_transform=seed_cell, dtype=jnp.float32)
    assert half.dtype == jnp.dtype(dtype)
    for a, b in zip(jax.tree.leaves(half), jax.tree.leaves(full)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(dtype)))
    # the recurrent blocks are still orthogonal to the precision of the dtype
    w = np.asarray(half.w_h[:, :8], np.float64)
    np.testing.assert_allclose(w.T @ w, np.eye(8), atol=4 * float(jnp.finfo(dtype).eps) * 8)


@pytest.mark.parametrize("bad", [0, -2])
def test_sizes_must_be_positive(bad):
    with pytest.raises(ValueError, match="hidden_size must be a positive int; received"):
        jaxlstm.init_params(jax.random.key(0), 3, bad)
    with pytest.raises(ValueError, match="input_size must be a positive int; received"):
        jaxlstm.init_params(jax.random.key(0), bad, 3)
