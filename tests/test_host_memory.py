"""``training.reuse_host_memory``: a compiled step's working buffers are reused, not page-faulted afresh.

Each case runs in a process of its own (the setting is the whole process's, and must come before JAX
starts its devices). What is counted is the kernel's minor page faults per call of a jitted training
gradient whose working buffers (XLA allocates its temporaries together; the saved gates of every step
alone are 25 MB) are above glibc's largest threshold for serving an allocation from its heap (32 MiB):
without the setting every call maps them afresh. ``python tests/test_host_memory.py`` prints both counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxlstm.training import reuse_host_memory

SCRIPT = r"""
import json, resource, statistics, sys
if sys.argv[1] == "reuse":
    from jaxlstm.training import reuse_host_memory
    applied = reuse_host_memory()
else:
    applied = None
import jax, jax.numpy as jnp, jaxlstm
params = jaxlstm.init_params(jax.random.key(0), 64, 384)
xs = jax.random.normal(jax.random.key(1), (32, 128, 64))
grad = jax.jit(jax.grad(lambda p, x: jnp.sum(jaxlstm.lstm(p, x)[0] ** 2), argnums=(0, 1)))
counts = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(grad(params, xs))
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# the median call after the first three (compilation, and the heap growing to its working size); the median,
# as on a busy machine a buffer may be freed after the next call started, and that call then grows the heap
print(json.dumps({"applied": applied, "faults_per_call": statistics.median(counts[3:])}))
"""

#: the saved gates alone are 32 * 128 * 1536 float32 = 25 MB: 6,144 pages of 4 KiB
GATE_PAGES = 32 * 128 * 4 * 384 * 4 // 4096


def _faults(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_reused_working_buffers_spare_the_page_faults_of_every_step():
    system = _faults("system")
    if system["faults_per_call"] < GATE_PAGES:
        pytest.skip(f"this XLA already reuses its working buffers ({system['faults_per_call']:.0f} faults per call)")
    reuse = _faults("reuse")
    assert reuse["applied"] is True
    # every call faults in at least the saved gates without the setting; with it, a small fraction
    assert reuse["faults_per_call"] < 0.25 * system["faults_per_call"], (reuse, system)


def test_it_reports_whether_it_applied(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert reuse_host_memory() is False


if __name__ == "__main__":  # the counts themselves: python tests/test_host_memory.py
    for mode in ("system", "reuse"):
        print(f"{mode}: {_faults(mode)['faults_per_call']:.0f} minor page faults per call")
