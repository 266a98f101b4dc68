"""The environment for the slow tier's short-lived subprocesses (notebooks, scripts, the README)."""

import os

#: These runs are compile-bound (each program runs a few steps): LLVM's cheaper optimisation level
#: halves their compile time and changes nothing they check. Runs whose speed or numbers are compared
#: (the fault-injection runs against their reference) keep the default.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def fast_compile_env(**extra: str) -> dict:
    """``os.environ`` plus :data:`FAST_COMPILE_FLAGS` (after any XLA flags already set) and ``extra``."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FAST_COMPILE_FLAGS not in flags:
        flags = " ".join(f for f in (flags, FAST_COMPILE_FLAGS) if f)
    return dict(os.environ, XLA_FLAGS=flags, **extra)


def default_compile_env(**extra: str) -> dict:
    """``os.environ`` without :data:`FAST_COMPILE_FLAGS` (which the test session sets), plus ``extra``:
    for runs bound by run time rather than compile time."""
    flags = " ".join(os.environ.get("XLA_FLAGS", "").replace(FAST_COMPILE_FLAGS, "").split())
    env = dict(os.environ, **extra)
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env
