"""Test configuration: float64 inside every test, strict promotion, no implicit rank promotion.

Doctests in ``jaxlstm/`` run in JAX's default (float32) mode, as a user's session would.
"""

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


@pytest.fixture
def peer_promotion():
    """Standard dtype and rank promotion, for tests that run peer libraries (optax, Flax's RNN
    drivers, Keras), which are not written for strict settings. jaxlstm's own code runs strict."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield
