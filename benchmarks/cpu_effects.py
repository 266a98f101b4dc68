"""Three CPU effects behind jaxlstm's design, measured side by side.

    python benchmarks/cpu_effects.py

1. A per-step matmul inside ``lax.scan`` with a transposed weight (``d @ w.T``,
   as autodiff writes it) against the same product with the weight transposed
   once before the loop (``d @ w_t``), at B = 8, H = 128, T = 512.
2. A computation whose large output (T, B, 4H) = (256, 32, 2048) float32
   (67 MB) goes to a fresh buffer, against the same computation written in
   place over a donated input.
3. Whether XLA:CPU runs independent work of one jitted function side by side:
   two independent scans (jaxlstm's forward, classic cell, each over half of
   a batch of 8; T = 512, I = 64, H = 128) in one function, against one of
   them alone. About 1x would mean the two ran on the two cores at once;
   about 2x, one after the other (so a library inside ``jit`` cannot hand
   half of a small step to a second core this way).

Each pair is timed in alternating rounds after warm-up, with
``block_until_ready``; medians. Writes ``<out>/cpu_effects.md`` and prints it.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
from timing import time_calls


def _scan_matmul(transposed_in_loop: bool, B=8, H=128, T=512):
    w = jax.random.normal(jax.random.key(0), (H, 4 * H)) * 0.01
    d = jax.random.normal(jax.random.key(1), (T, B, 4 * H))

    def run(w, d):
        w_t = None if transposed_in_loop else w.T  # built once, outside the loop

        def body(c, di):
            y = (di @ w.T if transposed_in_loop else di @ w_t) + c
            return y, y

        return jax.lax.scan(body, jnp.zeros((B, H)), d)[1]

    return jax.jit(run), (w, d), T


def matmul_layout(rounds: int) -> tuple[float, float]:
    """Per-step microseconds: (weight transposed in the loop, weight transposed once)."""
    fns = [_scan_matmul(True), _scan_matmul(False)]
    for f, a, _ in fns:
        jax.block_until_ready(f(*a))
    times = [[], []]
    for r in range(rounds):
        for k in (r % 2, 1 - r % 2):
            f, a, T = fns[k]
            times[k].append(time_calls(f, a) / T)
    return tuple(statistics.median(t) * 1e6 for t in times)


def fresh_vs_in_place(rounds: int, shape=(256, 32, 2048)) -> tuple[float, float, float]:
    """Milliseconds for ``2 * x`` into a fresh buffer and in place (donated input); and the MB."""
    x = jax.random.normal(jax.random.key(0), shape)
    fresh = jax.jit(lambda x: x * 2.0)
    in_place = jax.jit(lambda x: x * 2.0, donate_argnums=0)
    y = jax.block_until_ready(in_place(x * 1.0))
    jax.block_until_ready(fresh(x))
    times = [[], []]
    for r in range(rounds):
        for k in (r % 2, 1 - r % 2):
            t0 = time.perf_counter()
            if k == 0:
                out = jax.block_until_ready(fresh(x))
                times[0].append(time.perf_counter() - t0)
                del out  # freed, so the next call allocates afresh
            else:
                y = jax.block_until_ready(in_place(y))
                times[1].append(time.perf_counter() - t0)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3, x.nbytes / 1e6


def independent_scans(rounds: int, B=8, T=512, I=64, H=128) -> tuple[float, float]:
    """Milliseconds: (two independent half-batch scans in one jitted function, one of them alone)."""
    import jaxlstm

    p = jaxlstm.init_params(jax.random.key(0), I, H, output_transform=False)
    xs = jax.random.normal(jax.random.key(1), (T, B, I))
    half = B // 2

    def scan(x):
        return jaxlstm.lstm(p, x, time_major=True)[0]

    both = jax.jit(lambda x: (scan(x[:, :half]), scan(x[:, half:])))
    one = jax.jit(lambda x: scan(x[:, :half]))
    for f in (both, one):
        jax.block_until_ready(f(xs))
    times = [[], []]
    for r in range(rounds):
        for k in (r % 2, 1 - r % 2):
            times[k].append(time_calls((both, one)[k], (xs,), 10))
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    a = ap.parse_args(argv)
    nt, nn = matmul_layout(a.rounds)
    fresh, in_place, mb = fresh_vs_in_place(a.rounds)
    both, one = independent_scans(a.rounds)
    text = "\n".join(
        [
            f"jax {jax.__version__}, {jax.devices()[0].platform}; medians of {a.rounds} alternating rounds.",
            "",
            "| effect | slow | fast | ratio |",
            "|---|---:|---:|---:|",
            f"| per-step matmul (8, 512) @ (512, 128) in lax.scan: `d @ w.T` vs `d @ w_t` (transposed once) | "
            f"{nt:.1f} us/step | {nn:.1f} us/step | {nt / nn:.2f}x |",
            f"| {mb:.0f} MB output: fresh buffer vs in place (donated input) | {fresh:.1f} ms | {in_place:.1f} ms | "
            f"{fresh / in_place:.2f}x |",
            f"| two independent scans (batch 4 each, T = 512, H = 128) in one jitted function vs one of them alone "
            f"(~1x: side by side on two cores; ~2x: one after the other) | {both:.2f} ms | {one:.2f} ms | "
            f"{both / one:.2f}x |",
            "",
        ]
    )
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "cpu_effects.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
