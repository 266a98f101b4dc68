"""The feature-major forward scan (states ``(H, B)``) against the NumPy reference and the row-major scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm
from jaxlstm import _feature_major, _scan
from tests.helpers.problems import ATOL, RTOL, make
from tests.helpers.reference import run_batch


def _assert_equal_to_reference(hs, final, ref):
    ref_h, ref_c, ref_a = ref
    np.testing.assert_allclose(hs, ref_h, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(final.cell, ref_c, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(final.hidden, ref_a, rtol=RTOL, atol=ATOL)


@pytest.fixture
def everywhere(monkeypatch):
    """Take the feature-major scan at every size (the traces made under it are dropped afterwards)."""
    monkeypatch.setitem(_feature_major.MIN_HIDDEN, jax.default_backend(), 1)
    monkeypatch.setattr(_feature_major, "MIN_BATCH", 1)
    jax.clear_caches()
    yield
    jax.clear_caches()


def test_taken_at_large_hidden_sizes_and_batches_only():
    x = jnp.zeros((3, 16, 4))
    big = jaxlstm.init_params(jax.random.key(0), 4, 256)
    assert _feature_major.applies(big, x)
    assert not _feature_major.applies(jaxlstm.init_params(jax.random.key(0), 4, 128), x)
    assert not _feature_major.applies(big, jnp.zeros((3, 8, 4)))  # batch below MIN_BATCH
    assert not _feature_major.applies(big, jnp.zeros((3, 4)))  # unbatched
    assert not _feature_major.applies(big, jnp.zeros((3, 4, 4, 4)))  # two batch dimensions
    assert not _feature_major.applies(jaxlstm.init_params(jax.random.key(0), 4, 256, proj_size=8), x)
    assert not _feature_major.applies(jax.tree.map(lambda a: a.astype(jnp.bfloat16), big), x.astype(jnp.bfloat16))


@pytest.mark.parametrize("seed_cell", [True, False], ids=["seed", "classic"])
@pytest.mark.parametrize("B", [16, 32], ids=["one-matmul", "two-matmuls"])  # see TWO_MATMULS_BATCHES
def test_default_choice_matches_numpy_reference(seed_cell, B):
    # Given a size where the library takes the feature-major scan by itself
    H = 256
    rng, g, xs, c0, a0 = make(B + 7, B, 3, 5, H, seed_cell, scale=0.05)
    lengths = rng.integers(0, 4, size=B)
    lengths[0] = 3
    p = jaxlstm.params_from_gates(**g)
    assert _feature_major.applies(p, jnp.zeros((3, B, 5)))
    for reverse in (False, True):
        # When the layer runs (with lengths and an initial state)
        hs, final = jaxlstm.lstm(
            p, xs, jaxlstm.LSTMState(c0, a0), seq_lengths=jnp.asarray(lengths, jnp.int32), reverse=reverse
        )
        # Then it equals the reference loop
        _assert_equal_to_reference(hs, final, run_batch(g, xs, c0, a0, lengths, reverse))


@pytest.mark.parametrize("seed_cell", [True, False], ids=["seed", "classic"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_step_mask_with_holes_matches_numpy_reference(everywhere, seed_cell, reverse):
    rng, g, xs, c0, a0 = make(3, 3, 6, 2, 4, seed_cell)
    valid = rng.random((3, 6)) < 0.6
    p = jaxlstm.params_from_gates(**g)
    hs, final = jaxlstm.lstm(p, xs, jaxlstm.LSTMState(c0, a0), mask=jnp.asarray(valid), reverse=reverse)
    _assert_equal_to_reference(hs, final, run_batch(g, xs, c0, a0, None, reverse, valid))


@pytest.mark.parametrize("seed_cell", [True, False], ids=["seed", "classic"])
@pytest.mark.parametrize("two", [False, True], ids=["one-matmul", "two-matmuls"])
def test_equals_row_major_scan_with_recurrent_dropout_and_holes(monkeypatch, seed_cell, two):
    # The reference has no recurrent dropout: here the two layouts are compared with each other
    monkeypatch.setattr(_feature_major, "TWO_MATMULS_BATCHES", (1, 1000) if two else (0, 0))
    rng, g, xs, c0, a0 = make(5, 4, 7, 3, 5, seed_cell)
    p = jaxlstm.params_from_gates(**g)
    xs_t = jnp.swapaxes(jnp.asarray(xs), 0, 1)
    valid = jnp.asarray(rng.random((7, 4)) < 0.7)
    mask = jnp.asarray((rng.random((4, 5)) < 0.8) / 0.8)
    state = jaxlstm.LSTMState(jnp.asarray(c0), jnp.asarray(a0))
    for reverse in (False, True):
        with monkeypatch.context() as m:
            m.setattr(_feature_major, "MIN_HIDDEN", {})  # row-major everywhere
            row = _scan.plain_forward(p, xs_t, state, valid, mask, reverse, 1)
        feat = _feature_major.forward(p, xs_t, state, valid, mask, reverse, 1)
        for a, b in zip(jax.tree.leaves(row), jax.tree.leaves(feat)):
            np.testing.assert_allclose(b, a, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("checkpoint_every", [None, 2], ids=["whole", "chunks"])
def test_autodiff_through_it_equals_the_hand_written_gradient(everywhere, checkpoint_every):
    # bptt="autodiff" differentiates the forward scan itself (per chunk under jax.checkpoint with
    # checkpoint_every), which is now the feature-major one
    rng, g, xs, c0, a0 = make(9, 3, 5, 2, 4, True)
    p = jaxlstm.params_from_gates(**g)
    lengths = jnp.array([5, 2, 0], jnp.int32)
    w = jnp.asarray(rng.normal(size=(3, 5, 4)))

    def loss(p, xs, bptt):
        hs, final = jaxlstm.lstm(
            p, xs, jaxlstm.LSTMState(c0, a0), seq_lengths=lengths, bptt=bptt, checkpoint_every=checkpoint_every
        )
        return jnp.sum(hs * w) + jnp.sum(final.cell)

    auto = jax.grad(loss, argnums=(0, 1))(p, jnp.asarray(xs), "autodiff")
    custom = jax.grad(loss, argnums=(0, 1))(p, jnp.asarray(xs), "custom")
    for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(custom)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
