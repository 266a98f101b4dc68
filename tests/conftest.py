"""Test configuration: float64 inside every test, strict promotion, no implicit rank promotion.

Doctests in ``jaxlstm/`` run in JAX's default (float32) mode, as a user's session would.

The suite compiles at LLVM's cheaper optimisation level (``FAST_COMPILE_FLAGS``, set here before
JAX starts its backend, and inherited by the subprocesses): nearly every test compiles programs
that then run a few steps, and this cuts the fast tier's time by about 30% (115 s -> 82 s on the
2-core machine). It changes the machine code XLA emits, not what is computed. Set
``JAXLSTM_TEST_FULL_OPTIMISATION=1`` to run the suite with XLA's default optimisation.
"""

import os

from tests.helpers.processes import FAST_COMPILE_FLAGS

if os.environ.get("JAXLSTM_TEST_FULL_OPTIMISATION") != "1" and FAST_COMPILE_FLAGS not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), FAST_COMPILE_FLAGS) if f)

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

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


@pytest.fixture
def torch():
    """PyTorch, or a visible skip where it is not installed (only the PyTorch tests need it)."""
    return pytest.importorskip("torch", reason="PyTorch not installed: pip install 'jaxlstm[interop]'")


#: A parametrized test runs this many of its cases in the fast tier (spread over its grid); the
#: slow tier (CI) runs them all. Each case compiles its own programs, which is what costs the time.
FAST_CASES_PER_TEST = 1


def pytest_collection_modifyitems(config, items):
    groups = {}
    for item in items:
        if getattr(item, "callspec", None) is not None:
            groups.setdefault((item.module.__name__, item.originalname), []).append(item)
    for cases in groups.values():
        n = len(cases)
        if n <= FAST_CASES_PER_TEST:
            continue
        keep = {round(k * (n - 1) / max(FAST_CASES_PER_TEST - 1, 1)) for k in range(FAST_CASES_PER_TEST)}
        for k, item in enumerate(cases):
            if k not in keep:
                item.add_marker(pytest.mark.slow)
