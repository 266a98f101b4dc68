"""Speed of jaxlstm against every peer LSTM, side by side in one run.

    python benchmarks/speed.py            # the full grid (about 15-25 minutes on 2 CPU cores)
    python benchmarks/speed.py --quick    # a small grid, under two minutes
    python benchmarks/speed.py --cores 1  # every library on one core: how much of a gap is threads
    python benchmarks/speed.py --cpu-devices 2  # adds jaxlstm with the batch split over two CPU devices

For each size (B, T, I, H) every implementation is compiled and warmed up,
then timed in alternating rounds (each round measures every implementation
once, in a rotating order; a measurement repeats a call until it lasts about
100 ms, after a short idle gap so that no library pays for worker threads the
one before left busy), with ``block_until_ready``; the reported time is
the median over rounds. Two workloads: the forward pass, and a training step
(forward + backward of ``sum(outputs ** 2)`` with respect to the weights).

The machine's large-matmul rate is measured in the same run; each result is
also reported as a fraction of it (forward FLOPs ``2 T B 4H (I + H)``, plus
``2 T B H H`` for the output-map cell's map; a training step counts 3x).

Writes ``<out>/speed.md`` (the table), ``speed.json`` and ``speed.png`` (bars of
speed relative to Flax ``nn.RNN(OptimizedLSTMCell)``), and prints the table.
With ``--cpu-devices N`` JAX starts with N CPU devices and the table gains a
row marked as a setting: jaxlstm's classic cell with the batch split over the
N devices by ``jax.shard_map`` (the README's "CPU tuning"); the other rows run
on one device as before.

Results are saved after every size, so Ctrl-C keeps what was measured.
Peers that are not installed (``pip install -e ".[bench]"``) are reported as skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from timing import block, calls_for, time_calls

FULL_GRID = [(1, 1000, 32, 128), (8, 512, 64, 128), (64, 128, 256, 256), (32, 256, 128, 512), (128, 64, 512, 1024)]
QUICK_GRID = [(1, 200, 32, 64), (8, 128, 64, 128)]
BASELINE = "flax OptimizedLSTMCell"
#: Set by ``--cores``: the process is pinned to that many cores and PyTorch told to use as many threads.
CORES: int | None = None


class Skipped(Exception):
    """An implementation that does not apply to a size (the row says why)."""


# ------------------------------------------------------------------ implementations
# Each factory returns (forward, train_step, args) or raises ImportError.
# forward(*args) and train_step(*args) return arrays (JAX) or tensors (torch).


def _xs(B, T, I, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(1), (B, T, I), dtype)


def make_jaxlstm(output_transform: bool):
    def factory(B, T, I, H):
        import jaxlstm

        p = jaxlstm.init_params(jax.random.key(0), I, H, output_transform=output_transform)
        fwd = jax.jit(lambda p, x: jaxlstm.lstm(p, x)[0])
        train = jax.jit(jax.grad(lambda p, x: jnp.sum(jaxlstm.lstm(p, x)[0] ** 2)))
        return fwd, train, (p, _xs(B, T, I))

    return factory


def make_flax_linen(cell_name: str):
    def factory(B, T, I, H):
        import flax.linen as nn

        rnn = nn.RNN(getattr(nn, cell_name)(H))
        xs = _xs(B, T, I)
        v = rnn.init(jax.random.key(0), xs)
        fwd = jax.jit(lambda v, x: rnn.apply(v, x))
        train = jax.jit(jax.grad(lambda v, x: jnp.sum(rnn.apply(v, x) ** 2)))
        return fwd, train, (v, xs)

    return factory


def flax_nnx(B, T, I, H):
    from flax import nnx

    model = nnx.RNN(nnx.OptimizedLSTMCell(I, H, rngs=nnx.Rngs(0)))
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)

    def apply(state, x):  # an explicit zero carry: the RNN then draws no rng
        z = jnp.zeros((x.shape[0], H), x.dtype)
        return nnx.merge(graphdef, state, rest)(x, initial_carry=(z, z))

    fwd = jax.jit(apply)
    train = jax.jit(jax.grad(lambda s, x: jnp.sum(apply(s, x) ** 2)))
    return fwd, train, (state, _xs(B, T, I))


def equinox_cell(B, T, I, H):
    import equinox as eqx

    cell = eqx.nn.LSTMCell(I, H, key=jax.random.key(0))

    def apply(cell, xs):
        def one(x):  # (T, I)
            def step(carry, xt):
                carry = cell(xt, carry)
                return carry, carry[0]

            z = jnp.zeros((H,), xs.dtype)
            return jax.lax.scan(step, (z, z), x)[1]

        return jax.vmap(one)(xs)

    fwd = eqx.filter_jit(apply)
    train = eqx.filter_jit(eqx.filter_grad(lambda c, x: jnp.sum(apply(c, x) ** 2)))
    return fwd, train, (cell, _xs(B, T, I))


def haiku_lstm(B, T, I, H):
    import haiku as hk

    def f(x):
        core = hk.LSTM(H)
        return hk.dynamic_unroll(core, x, core.initial_state(x.shape[0]), time_major=False)[0]

    fn = hk.without_apply_rng(hk.transform(f))
    xs = _xs(B, T, I)
    params = fn.init(jax.random.key(0), xs)
    fwd = jax.jit(fn.apply)
    train = jax.jit(jax.grad(lambda p, x: jnp.sum(fn.apply(p, x) ** 2)))
    return fwd, train, (params, xs)


def torch_lstm(B, T, I, H):
    import torch

    if CORES is not None:
        torch.set_num_threads(CORES)
    torch.manual_seed(0)
    m = torch.nn.LSTM(I, H, batch_first=True)
    x = torch.randn(B, T, I)

    def fwd(m, x):
        with torch.no_grad():
            return m(x)[0]

    def train(m, x):
        m.zero_grad(set_to_none=True)
        loss = (m(x)[0] ** 2).sum()
        loss.backward()
        return m.weight_hh_l0.grad

    return fwd, train, (m, x)


def make_jaxlstm_split(devices: int):
    """jaxlstm's classic cell with the batch split over ``devices`` CPU devices (``jax.shard_map``)."""

    def factory(B, T, I, H):
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        import jaxlstm

        if B % devices:
            raise Skipped(f"batch {B} does not split over {devices} devices")
        mesh = Mesh(np.array(jax.devices()[:devices]), ("batch",))
        split = dict(mesh=mesh, in_specs=(P(), P("batch")))

        def run(p, x):
            return jaxlstm.lstm(p, x)[0]

        fwd = jax.jit(jax.shard_map(run, out_specs=P("batch"), **split))
        train = jax.jit(jax.shard_map(jax.grad(lambda p, x: jnp.sum(run(p, x) ** 2)), out_specs=P(), **split))
        p = jaxlstm.init_params(jax.random.key(0), I, H, output_transform=False)
        xs = jax.device_put(_xs(B, T, I), NamedSharding(mesh, P("batch")))
        args = (jax.device_put(p, NamedSharding(mesh, P())), xs)
        return fwd, train, args

    return factory


def split_name(devices: int) -> str:
    return f"jaxlstm classic, batch over {devices} CPU devices (setting)"


IMPLEMENTATIONS: dict[str, Callable] = {
    "jaxlstm seed": make_jaxlstm(True),
    "jaxlstm classic": make_jaxlstm(False),
    BASELINE: make_flax_linen("OptimizedLSTMCell"),
    "flax LSTMCell": make_flax_linen("LSTMCell"),
    "flax nnx OptimizedLSTMCell": flax_nnx,
    "equinox LSTMCell": equinox_cell,
    "haiku LSTM": haiku_lstm,
    "torch nn.LSTM": torch_lstm,
}


def matmul_rate(n: int = 2048, repeats: int = 7) -> float:
    """The machine's large float32 matmul rate, in FLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    block(f(a, b))
    times = [time_calls(f, (a, b)) for _ in range(repeats)]
    return 2 * n**3 / statistics.median(times)


def flops(B, T, I, H, seed_cell: bool) -> float:
    f = 2 * T * B * 4 * H * (I + H)
    if seed_cell:
        f += 2 * T * B * H * H
    return float(f)


def bench_size(size, names, rounds: int, peak: float, progress: Callable | None = None, gap: float = 0.0) -> list[dict]:
    B, T, I, H = size
    prepared = {}
    rows = []
    for name in names:
        try:
            fwd, train, args = IMPLEMENTATIONS[name](B, T, I, H)
        except ImportError as e:
            rows.append(dict(impl=name, size=list(size), skipped=f"not installed ({e.name})"))
            continue
        except Skipped as e:
            rows.append(dict(impl=name, size=list(size), skipped=str(e)))
            continue
        for fn in (fwd, train):  # compile and warm up
            block(fn(*args))
            block(fn(*args))
        prepared[name] = (fwd, train, args, calls_for(fwd, args), calls_for(train, args))
    times = {name: {"forward": [], "train": []} for name in prepared}
    order = list(prepared)
    for r in range(rounds):
        rotated = order[r % len(order) :] + order[: r % len(order)]
        for name in rotated:
            fwd, train, args, n_fwd, n_train = prepared[name]
            time.sleep(gap)  # let the previous library's worker threads go idle (see --gap)
            times[name]["forward"].append(time_calls(fwd, args, n_fwd))
            times[name]["train"].append(time_calls(train, args, n_train))
        if progress:
            progress()
    for name in prepared:
        seed = name == "jaxlstm seed"
        row = dict(impl=name, size=list(size))
        for kind, mult in (("forward", 1), ("train", 3)):
            med = statistics.median(times[name][kind])
            row[f"{kind}_s"] = med
            row[f"{kind}_roofline"] = mult * flops(B, T, I, H, seed) / med / peak
        rows.append(row)
    base = next((r for r in rows if r["impl"] == BASELINE and "skipped" not in r), None)
    for row in rows:
        if base and "skipped" not in row:
            row["forward_speedup"] = base["forward_s"] / row["forward_s"]
            row["train_speedup"] = base["train_s"] / row["train_s"]
    return rows


def table(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']}; {results['date']}; jax {results['jax']}; "
        f"matmul roofline {results['peak_gflops']:.0f} GF/s (float32, {results['matmul_n']}^3).",
        "",
        "Speedup = time of Flax `nn.RNN(OptimizedLSTMCell)` / time of the row (higher is faster); "
        "roofline = achieved FLOP/s as a fraction of the machine's matmul rate.",
        "",
    ]
    if results.get("cpu_devices"):
        lines += [
            f"Rows marked (setting): JAX started with {results['cpu_devices']} CPU devices (`--cpu-devices`) and the "
            'batch split over them with `jax.shard_map`; a setting of the user\'s process (README, "CPU tuning"), '
            "not jaxlstm's default. Every other row runs on one device.",
            "",
        ]
    lines += [
        "| B, T, I, H | implementation | forward ms | forward speedup | forward roofline "
        "| train ms | train speedup | train roofline |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        size = ", ".join(map(str, row["size"]))
        if "skipped" in row:
            lines.append(f"| {size} | {row['impl']} | skipped: {row['skipped']} | | | | | |")
            continue
        sp = lambda k, row=row: f"{row[k]:.2f}x" if k in row else "-"
        lines.append(
            f"| {size} | {row['impl']} | {row['forward_s'] * 1e3:.2f} | {sp('forward_speedup')} | "
            f"{row['forward_roofline']:.0%} | {row['train_s'] * 1e3:.2f} | {sp('train_speedup')} | "
            f"{row['train_roofline']:.0%} |"
        )
    return "\n".join(lines) + "\n"


#: The project's floors live in floors.json beside this script (what each number means is written there).
FLOORS = json.loads((pathlib.Path(__file__).with_name("floors.json")).read_text())
TRAIN_FLOORS = {tuple(int(n) for n in k.split(",")): v for k, v in FLOORS["train_vs_flax"].items()}
FORWARD_NOISE = FLOORS["forward_noise"]
SEED_MARGIN = FLOORS["seed_margin"]


def floor_checks(results: dict) -> str:
    """The floors, checked on this run's medians: one line per size, ``ok`` or ``MISSED``."""
    by = {(tuple(r["size"]), r["impl"]): r for r in results["rows"] if "skipped" not in r}
    lines = []
    for size in dict.fromkeys(tuple(r["size"]) for r in results["rows"]):
        classic, seed = by.get((size, "jaxlstm classic")), by.get((size, "jaxlstm seed"))
        torch = by.get((size, "torch nn.LSTM"))
        if classic is None or "train_speedup" not in classic:
            continue
        B, T, I, H = size
        parts = []
        floor = TRAIN_FLOORS.get(size, FLOORS["default_train_vs_flax"])
        parts.append(
            _check(f"classic train {classic['train_speedup']:.2f}x", classic["train_speedup"] >= floor, f">= {floor}x")
        )
        parts.append(
            _check(
                f"classic forward {classic['forward_speedup']:.2f}x",
                classic["forward_speedup"] >= FORWARD_NOISE,
                f">= {FORWARD_NOISE}x",
            )
        )
        if torch is not None:
            for kind, key in (("train", "train_vs_torch"), ("forward", "forward_vs_torch")):
                ratio = torch[f"{kind}_s"] / classic[f"{kind}_s"]
                parts.append(
                    _check(f"classic {kind} vs PyTorch {ratio:.2f}x", ratio >= FLOORS[key], f">= {FLOORS[key]}x")
                )
        if seed is not None:
            allowed = 1 + H / (4 * (I + H)) + SEED_MARGIN
            for kind in ("forward", "train"):
                cost = seed[f"{kind}_s"] / classic[f"{kind}_s"]
                parts.append(_check(f"seed/classic {kind} {cost:.2f}", cost <= allowed, f"<= {allowed:.2f}"))
            cost = seed["forward_s"] / classic["forward_s"]
            bound = FLOORS["seed_forward_max"]
            parts.append(_check(f"seed/classic forward {cost:.2f}", cost <= bound, f"<= {bound}"))
        devices = results.get("cpu_devices")
        split = by.get((size, split_name(devices))) if devices else None
        if split is not None and torch is not None:  # not a floor: what the setting gives, beside them
            fwd, train = torch["forward_s"] / split["forward_s"], torch["train_s"] / split["train_s"]
            parts.append(
                f"with the setting (batch over {devices} CPU devices): forward vs PyTorch {fwd:.2f}x, "
                f"train vs PyTorch {train:.2f}x"
            )
        lines.append(f"- ({', '.join(map(str, size))}): " + "; ".join(parts))
    if not lines:
        return ""
    return "\nFloors on this run (speedups vs Flax `nn.RNN(OptimizedLSTMCell)`):\n\n" + "\n".join(lines) + "\n"


def _check(text: str, ok: bool, bound: str) -> str:
    return f"{text} ({bound}: {'ok' if ok else 'MISSED'})"


def chart(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if "train_speedup" in r]
    sizes = sorted({tuple(r["size"]) for r in rows}, key=lambda s: results["grid"].index(list(s)))
    impls = [n for n in IMPLEMENTATIONS if any(r["impl"] == n for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=False)
    width = 0.8 / max(1, len(impls))
    for ax, kind in zip(axes, ("forward", "train")):
        for j, name in enumerate(impls):
            vals = []
            for s in sizes:
                r = next((r for r in rows if r["impl"] == name and tuple(r["size"]) == s), None)
                vals.append(r[f"{kind}_speedup"] if r else 0.0)
            ax.bar(np.arange(len(sizes)) + j * width, vals, width, label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(sizes)) + 0.4 - width / 2)
        ax.set_xticklabels(["B,T,I,H=\n" + ",".join(map(str, s)) for s in sizes], fontsize=8)
        ax.set_title(f"{kind}: speed relative to Flax OptimizedLSTMCell (higher is faster)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(results: dict, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(results, indent=1))
    (out / "speed.md").write_text(table(results) + floor_checks(results))
    if any("train_speedup" in r for r in results["rows"]):
        chart(results, out / "speed.png")


def _pin(parser: argparse.ArgumentParser, cores: int) -> None:
    """Pin this process to ``cores`` of the cores it may use (before JAX creates its thread pool)."""
    global CORES
    if not hasattr(os, "sched_setaffinity"):
        parser.error("--cores needs a system with CPU affinity (Linux)")
    allowed = sorted(os.sched_getaffinity(0))
    if not 1 <= cores <= len(allowed):
        parser.error(f"--cores must be from 1 to the {len(allowed)} cores this process may use, got {cores}")
    os.sched_setaffinity(0, allowed[:cores])
    CORES = cores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small grid, few rounds (under two minutes)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per size (default 15, quick 5)")
    parser.add_argument("--sizes", type=str, default=None, help="e.g. '8,512,64,128;1,1000,32,128'")
    parser.add_argument(
        "--impls", type=str, default=None, help="comma-separated subset of: " + ", ".join(IMPLEMENTATIONS)
    )
    parser.add_argument(
        "--gap",
        type=float,
        default=0.25,
        help="seconds of idle before each implementation's measurement (default 0.25): a library's worker threads "
        "(PyTorch's OpenMP, XLA's pool) can stay busy for a moment after a call and take a core from what runs next",
    )
    parser.add_argument(
        "--cores",
        type=int,
        default=None,
        help="run on this many CPU cores only (the process is pinned before JAX starts; PyTorch gets as many "
        "threads): shows how much of a gap between libraries is their use of a second core",
    )
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="start JAX with this many CPU devices and add a row for jaxlstm with the batch split over them "
        "(jax.shard_map): the setting the README's 'CPU tuning' describes",
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    grid = QUICK_GRID if args.quick else FULL_GRID
    if args.sizes:
        grid = [tuple(int(v) for v in s.split(",")) for s in args.sizes.split(";")]
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.gap < 0:
        parser.error(f"--gap is seconds of idle, at least 0; got {args.gap}")
    if args.cores is not None:
        _pin(parser, args.cores)
    if args.cpu_devices is not None and args.cpu_devices < 2:
        parser.error(f"--cpu-devices must be at least 2 (the batch is split over them), got {args.cpu_devices}")
    rounds = args.rounds or (5 if args.quick else 15)
    names = list(IMPLEMENTATIONS) if not args.impls else [n.strip() for n in args.impls.split(",")]
    unknown = [n for n in names if n not in IMPLEMENTATIONS]
    if unknown:
        parser.error(f"unknown implementations {unknown}; choose from {list(IMPLEMENTATIONS)}")
    if args.cpu_devices is not None:  # the marked row comes with the setting, whatever --impls says
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before JAX starts its backend
        IMPLEMENTATIONS[split_name(args.cpu_devices)] = make_jaxlstm_split(args.cpu_devices)
        names.append(split_name(args.cpu_devices))

    from tqdm import tqdm

    peak = matmul_rate()
    results = dict(
        machine=(
            f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, {jax.devices()[0].device_kind}"
        ).replace("  ", " ")
        + (f", pinned to {CORES} of them (--cores)" if CORES is not None else ""),
        cores=CORES,
        cpu_devices=args.cpu_devices,
        cores_allowed=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        date=datetime.date.today().isoformat(),
        jax=jax.__version__,
        python=sys.version.split()[0],
        peak_gflops=peak / 1e9,
        matmul_n=2048,
        rounds=rounds,
        gap_s=args.gap,
        grid=[list(s) for s in grid],
        rows=[],
    )
    bar = tqdm(total=len(grid) * rounds, desc="benchmark", unit="round")
    try:
        for size in grid:
            bar.set_postfix_str(f"B,T,I,H={size}")
            results["rows"] += bench_size(size, names, rounds, peak, progress=lambda: bar.update(1), gap=args.gap)
            save(results, args.out)
    except KeyboardInterrupt:
        print("\ninterrupted: keeping the sizes measured so far", file=sys.stderr)
    finally:
        bar.close()
    save(results, args.out)
    print(table(results) + floor_checks(results))
    print(f"written: {args.out / 'speed.md'}, speed.json, speed.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
