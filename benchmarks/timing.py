"""The one timing loop the benchmark scripts share: wait for the result, time back-to-back calls."""

from __future__ import annotations

import time

import jax


def block(out):
    """Wait until ``out`` is computed (JAX arrays; a torch tensor on the CPU is ready already)."""
    if hasattr(out, "detach"):
        return out
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
