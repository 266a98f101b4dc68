"""Peak memory of one training step on long sequences, with and without ``checkpoint_every``.

    python benchmarks/memory.py                  # T = 10,000 and 100,000; B = 16, I = H = 256
    python benchmarks/memory.py --run            # also run the steps that fit, measuring the process's peak RSS

A training step is ``jax.grad`` of ``sum(outputs ** 2)`` with respect to the
weights, for the output-map cell. For each setting XLA's buffer assignment of the
compiled step is read (``compiled.memory_analysis()``: arguments + outputs +
temporaries = the memory the step needs at its peak, before running it).
With ``--run`` each step that needs less than ``--max-gb`` is also executed in
a fresh subprocess, and its peak resident memory (``ru_maxrss``) reported.
Writes ``memory.md`` and ``memory.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import subprocess
import sys

GB = 1024**3

CHILD = r"""
import resource, sys, time
import jax, jax.numpy as jnp, jaxlstm
T, B, I, H, k = (int(v) if v != "None" else None for v in sys.argv[1:6])
p = jaxlstm.init_params(jax.random.key(0), I, H)
xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
step = jax.jit(jax.grad(lambda p, x: jnp.sum(jaxlstm.lstm(p, x, checkpoint_every=k)[0] ** 2)))
t0 = time.perf_counter(); jax.block_until_ready(step(p, xs)); t = time.perf_counter() - t0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, t)
"""


def analyse(T, B, I, H, k):
    import jax
    import jax.numpy as jnp

    import jaxlstm

    p = jax.eval_shape(lambda: jaxlstm.init_params(jax.random.key(0), I, H))
    xs = jax.ShapeDtypeStruct((B, T, I), jnp.float32)
    step = jax.jit(jax.grad(lambda p, x: jnp.sum(jaxlstm.lstm(p, x, checkpoint_every=k)[0] ** 2)))
    m = step.lower(p, xs).compile().memory_analysis()
    return dict(
        arguments=m.argument_size_in_bytes,
        outputs=m.output_size_in_bytes,
        temporaries=m.temp_size_in_bytes,
        total=m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="10000,100000")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=256, help="I = H")
    ap.add_argument("--run", action="store_true")
    ap.add_argument("--max-gb", type=float, default=8.0)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    a = ap.parse_args(argv)
    rows = []
    for T in (int(v) for v in a.lengths.split(",")):
        for k in (None, int(math.sqrt(T))):
            row = dict(T=T, B=a.batch, I=a.size, H=a.size, checkpoint_every=k, **analyse(T, a.batch, a.size, a.size, k))
            if a.run and row["total"] < a.max_gb * GB:
                args = [str(v) for v in (T, a.batch, a.size, a.size, k)]
                res = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
                rss, secs = res.stdout.split()
                row.update(peak_rss=int(rss), step_s=float(secs))
            rows.append(row)
            print(
                {
                    key: (
                        f"{v / GB:.2f} GB" if key in ("arguments", "outputs", "temporaries", "total", "peak_rss") else v
                    )
                    for key, v in row.items()
                }
            )
    lines = [
        f"Training step (grad of sum(outputs**2), output-map cell), B = {a.batch}, I = H = {a.size}, float32.",
        "",
        "| T | checkpoint_every | XLA buffers at peak (args + outputs + temps) | measured peak RSS | step time |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rss = f"{r['peak_rss'] / GB:.2f} GB" if "peak_rss" in r else "not run"
        st = f"{r['step_s']:.1f} s (incl. compile)" if "step_s" in r else "-"
        lines.append(f"| {r['T']:,} | {r['checkpoint_every'] or 'None'} | {r['total'] / GB:.2f} GB | {rss} | {st} |")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "memory.md").write_text("\n".join(lines) + "\n")
    (a.out / "memory.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
