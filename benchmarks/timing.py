"""The one timing loop the benchmark scripts share: wait for the result, time back-to-back calls."""

from __future__ import annotations

import pathlib
import platform
import time


def block(out):
    """Wait until ``out`` is computed (JAX arrays; a torch tensor on the CPU is ready already)."""
    if hasattr(out, "detach"):
        return out
    import jax  # here, so that a script can name its CPU without starting JAX

    return jax.block_until_ready(out)


def time_calls(fn, args, calls: int = 1) -> float:
    """Seconds per call, over ``calls`` back-to-back calls, each waited for."""
    t0 = time.perf_counter()
    for _ in range(calls):
        block(fn(*args))
    return (time.perf_counter() - t0) / calls


def calls_for(fn, args, target_s: float = 0.1) -> int:
    """Calls per measurement so that one measurement lasts about ``target_s`` (short calls are noisy)."""
    return max(1, min(200, int(target_s / max(time_calls(fn, args), 1e-6))))


def cpu_model() -> str:
    """The CPU's model name, named beside every figure (machines differ: AVX2-only ones run 2-3x slower)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
