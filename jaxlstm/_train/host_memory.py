"""Keeping freed host memory for reuse: XLA:CPU's working buffers without a page fault per 4 KiB per step.

On the CPU, each call of a compiled function allocates its working buffers
(for a training step, the saved gates and states of every time step, in one
allocation; the gates alone are 25 MB at the main job's size) and frees them when it returns.
glibc serves allocations this large with a fresh ``mmap`` and returns them
with ``munmap`` (its threshold for that is at most 32 MiB), so every step
touches new pages and the kernel zeroes each 4 KiB page on its first write.
``python tests/test_host_memory.py`` counts those page faults with and
without this; ``benchmarks/scaling.py`` times ``jaxlstm train``'s step both
ways (0.162 s without, 0.133 s with, on a 2-core AMD EPYC).

:func:`reuse_host_memory` asks glibc to keep such memory in its heap instead,
so that the next step reuses the same pages. It is a setting of the whole
process, so the library never makes it on its own: the ``jaxlstm`` command
does (``--allocator system`` to leave it), and a program of your own can call
it once, before JAX starts its devices.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

#: what :func:`reuse_host_memory` sets: no allocation by ``mmap`` (so none is unmapped when freed); up to
#: 2 GiB of free memory kept at the top of the heap; one heap for every thread (a thread's own heap is
#: unmapped when it empties, and it empties after every step).
SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1))


def reuse_host_memory() -> bool:
    """Make the C library keep freed memory for reuse; returns whether it applied (Linux with glibc).

    Large buffers that a compiled function allocates and frees on every call
    (XLA:CPU's working buffers: the training step's saved activations) are
    then reused from one call to the next rather than mapped afresh, which on
    the CPU spares a page fault per 4 KiB of them on every step. The memory a
    step needs at its peak is unchanged; what changes is that the process
    keeps it between steps (and keeps up to 2 GiB of freed memory in all).

    A setting of the whole process: call it once, early (before JAX starts
    its devices, for the full effect). Elsewhere (macOS, Windows, a C library
    other than glibc) it does nothing and returns ``False``. The ``jaxlstm``
    command calls it for ``train`` unless given ``--allocator system``.

    Example:
      >>> from jaxlstm.training import reuse_host_memory
      >>> applied = reuse_host_memory()  # True on Linux with glibc
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only (musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all([mallopt(param, value) == 1 for param, value in SETTINGS])
