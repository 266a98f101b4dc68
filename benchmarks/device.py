"""jaxlstm on a GPU or TPU, against Flax and cuDNN, in one run of under four minutes.

    python benchmarks/device.py                 # the device grid, float32 and bfloat16
    python benchmarks/device.py --smoke         # tiny sizes, any platform (the test suite runs it on the CPU)

Implementations: jaxlstm with each ``impl`` (``scan`` and ``pallas`` for both
cells, ``cudnn`` for the classic cell where it runs), Flax ``nn.RNN(OptimizedLSTMCell)`` and
cuDNN called directly through ``jax.experimental.rnn``. Workloads: the forward
pass and a training step (value and gradient of ``sum(outputs ** 2)`` with
respect to the weights and inputs). For each size every implementation is
compiled and warmed up, then timed in alternating rounds (``block_until_ready``,
medians). The chip's matmul rate is measured in the same run (float32 and
bfloat16), and each result is also given as the fraction of it achieved
(forward FLOPs ``2 T B 4H (I + H)``, plus ``2 T B H H`` for the output-map
cell; a training step counts 3x). An implementation that cannot run here
(e.g. cuDNN without a CUDA GPU, the Pallas kernels at sizes Triton cannot
tile) is listed as skipped, with the reason. On a CPU the Pallas rows run the
kernels through the Pallas interpreter in ``--smoke`` mode (a check that they
run, not a speed) and are skipped otherwise.

Writes ``<out>/device.md`` and ``device.json`` (default ``benchmarks/results``)
after every size, so a stopped run keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from timing import block, calls_for, time_calls

GRID = [(64, 512, 256), (256, 128, 1024), (16, 1000, 512), (1024, 128, 128)]  # (B, T, H); I = H
SMOKE_GRID = [(2, 6, 4)]
SMOKE = False  # set by --smoke: the Pallas rows run interpreted on a CPU
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _inputs(B, T, I, dtype):
    return jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32).astype(dtype)


def _steps(apply: Callable, params, xs):
    fwd = jax.jit(apply)
    train = jax.jit(jax.grad(lambda p, x: jnp.sum(apply(p, x).astype(jnp.float32) ** 2), argnums=(0, 1)))
    return fwd, train, (params, xs)


def jaxlstm_impl(impl: str, seed_cell: bool):
    def factory(B, T, I, H, dtype):
        import jaxlstm

        p = jaxlstm.init_params(jax.random.key(0), I, H, output_transform=seed_cell, dtype=dtype)
        chosen = impl
        if impl == "pallas" and jax.default_backend() not in ("gpu", "tpu"):
            if not SMOKE:
                raise RuntimeError(f"no Pallas kernels on {jax.default_backend()} (interpreted only with --smoke)")
            chosen = "pallas_interpret"
        apply = lambda p, x: jaxlstm.lstm(p, x, impl=chosen)[0]
        jax.eval_shape(apply, p, _inputs(B, T, I, dtype))  # raises here if this impl cannot run
        return _steps(apply, p, _inputs(B, T, I, dtype))

    return factory


def flax_optimized(B, T, I, H, dtype):
    import flax.linen as nn

    rnn = nn.RNN(nn.OptimizedLSTMCell(H, dtype=dtype, param_dtype=jnp.float32))
    xs = _inputs(B, T, I, dtype)
    return _steps(lambda v, x: rnn.apply(v, x), rnn.init(jax.random.key(0), xs), xs)


def cudnn_direct(B, T, I, H, dtype):
    from jax.experimental import rnn

    if jax.default_backend() != "gpu":
        raise RuntimeError(f"cuDNN needs a CUDA GPU; this is {jax.default_backend()}")
    w = rnn.init_lstm_weight(jax.random.key(0), I, H, 1, False).astype(dtype)
    zeros = jnp.zeros((1, B, H), dtype)
    lengths = jnp.full((B,), T, jnp.int32)
    apply = lambda w, x: rnn.lstm(x, zeros, zeros, w, lengths, I, H, 1, 0.0, False)[0]
    return _steps(apply, w, _inputs(B, T, I, dtype))


IMPLEMENTATIONS: dict[str, Callable] = {
    "jaxlstm scan (output-map cell)": jaxlstm_impl("scan", True),
    "jaxlstm scan (classic)": jaxlstm_impl("scan", False),
    "jaxlstm pallas (output-map cell)": jaxlstm_impl("pallas", True),
    "jaxlstm pallas (classic)": jaxlstm_impl("pallas", False),
    "jaxlstm cudnn (classic)": jaxlstm_impl("cudnn", False),
    "jaxlstm auto (classic)": jaxlstm_impl("auto", False),
    "flax OptimizedLSTMCell": flax_optimized,
    "cuDNN (jax.experimental.rnn)": cudnn_direct,
}


def matmul_rate(dtype, n: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(jnp.matmul)
    block(f(a, a))
    return 2 * n**3 / statistics.median(time_calls(f, (a, a), calls_for(f, (a, a), 0.05)) for _ in range(5))


def flops(B, T, I, H, seed_cell: bool) -> float:
    return float(2 * T * B * 4 * H * (I + H) + (2 * T * B * H * H if seed_cell else 0))


def bench(size, dtype_name, names, rounds, peak, target_s) -> list[dict]:
    B, T, H = size
    I = H
    dtype = DTYPES[dtype_name]
    prepared, rows = {}, []
    for name in names:
        try:
            fwd, train, args = IMPLEMENTATIONS[name](B, T, I, H, dtype)
            for fn in (fwd, train):
                block(fn(*args))
        except Exception as e:  # an implementation that cannot run here is reported, not fatal
            rows.append(dict(impl=name, size=[B, T, I, H], dtype=dtype_name, skipped=f"{type(e).__name__}: {e}"[:160]))
            continue
        prepared[name] = (fwd, train, args, calls_for(fwd, args, target_s), calls_for(train, args, target_s))
    times: dict = {name: {"forward": [], "train": []} for name in prepared}
    order = list(prepared)
    for r in range(rounds):
        for name in order[r % max(len(order), 1) :] + order[: r % max(len(order), 1)]:
            fwd, train, args, n_fwd, n_train = prepared[name]
            times[name]["forward"].append(time_calls(fwd, args, n_fwd))
            times[name]["train"].append(time_calls(train, args, n_train))
    for name in prepared:
        fwd_s, train_s = (statistics.median(times[name][k]) for k in ("forward", "train"))
        f = flops(B, T, I, H, "output-map" in name)
        rows.append(
            dict(
                impl=name,
                size=[B, T, I, H],
                dtype=dtype_name,
                forward_s=fwd_s,
                train_s=train_s,
                forward_of_peak=f / fwd_s / peak,
                train_of_peak=3 * f / train_s / peak,
            )
        )
    return rows


def table(rows: list[dict], device: str) -> str:
    lines = [
        f"# jaxlstm on {device}",
        "",
        "Medians over alternating rounds; `of peak` is the achieved fraction of the matmul rate measured in the "
        "same run for that dtype. Rerun: `python benchmarks/device.py`.",
        "",
        "| B, T, I, H | dtype | implementation | forward ms | train ms | forward of peak | train of peak |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        size = ", ".join(map(str, r["size"]))
        if "skipped" in r:
            lines.append(f"| {size} | {r['dtype']} | {r['impl']} | skipped: {r['skipped']} | | | |")
        else:
            lines.append(
                f"| {size} | {r['dtype']} | {r['impl']} | {r['forward_s'] * 1e3:.2f} | {r['train_s'] * 1e3:.2f} | "
                f"{r['forward_of_peak']:.1%} | {r['train_of_peak']:.1%} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, two rounds: a check that it runs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    global SMOKE
    SMOKE = args.smoke
    grid = SMOKE_GRID if args.smoke else GRID
    names = [n.strip() for n in args.impls.split(",") if n.strip()]
    unknown = sorted(set(names) - set(IMPLEMENTATIONS))
    if unknown:
        print(f"device.py: error: unknown implementations {unknown}; known: {sorted(IMPLEMENTATIONS)}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    n = 256 if args.smoke else 8192
    peaks = {d: matmul_rate(DTYPES[d], n) for d in args.dtypes.split(",")}
    rows: list[dict] = []
    t0 = time.perf_counter()
    for size in grid:
        for d, peak in peaks.items():
            rows += bench(size, d, names, 2 if args.smoke else args.rounds, peak, 0.01 if args.smoke else 0.05)
            text = table(rows, device)
            (out / "device.md").write_text(text)
            meta = dict(device=device, date=datetime.date.today().isoformat(), matmul_flops=peaks, rows=rows)
            (out / "device.json").write_text(json.dumps(meta, indent=1))
            print(f"[{time.perf_counter() - t0:.0f} s] {size} {d} done", flush=True)
    print(table(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
