"""The environment for the slow tier's short-lived subprocesses (notebooks, scripts, the README)."""

import os

#: These runs are compile-bound (each program runs a few steps): LLVM's cheaper optimisation level
#: halves their compile time and changes nothing they check. Runs whose speed or numbers are compared
#: (the fault-injection runs against their reference) keep the default.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def fast_compile_env(**extra: str) -> dict:
    """``os.environ`` plus :data:`FAST_COMPILE_FLAGS` (after any XLA flags already set) and ``extra``."""
    flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), FAST_COMPILE_FLAGS) if f)
    return dict(os.environ, XLA_FLAGS=flags, **extra)
