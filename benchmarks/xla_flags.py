"""What XLA:CPU's flags buy jaxlstm, measured side by side: the README's "CPU tuning" table.

    python benchmarks/xla_flags.py            # three workloads, three settings, 3 rounds (about 7 minutes)
    python benchmarks/xla_flags.py --quick    # a check that it runs: one tiny workload, two settings, one round

XLA reads its flags once, when JAX starts its backend, so each measurement is
a fresh process with ``XLA_FLAGS`` set (after any flags already in the
environment). The settings: XLA's defaults, ``--xla_cpu_use_xnnpack=true``
and ``--xla_cpu_use_onednn=true``. The workloads: the main job's training
step (``jaxlstm train``'s model and batch, output-map and classic cell) and a
classic layer's training step (value and gradient of ``sum(outputs ** 2)``
with respect to the weights and inputs) at (B, T, I, H) = (8, 512, 64, 128).
Every process compiles and warms up, then times its workload (medians of
back-to-back calls, each waited for); the settings run in alternating order,
round after round, and each cell of the table is the median over the
rounds, with its ratio to the default setting (below 1: faster).

Writes ``<out>/xla_flags.md`` and ``xla_flags.json`` (default
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys

SETTINGS = {
    "XLA defaults": "",
    "--xla_cpu_use_xnnpack=true": "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_use_onednn=true": "--xla_cpu_use_onednn=true",
}
WORKLOADS = {
    "main job training step, output-map cell": ("charlm", True),
    "main job training step, classic cell": ("charlm", False),
    "classic layer training step (8, 512, 64, 128)": ("layer", False),
}


def _measure(workload: str, quick: bool) -> float:
    """Milliseconds per call of one workload, in this process (its XLA flags already set)."""
    import jax
    import jax.numpy as jnp
    from timing import calls_for, time_calls

    kind, seed_cell = WORKLOADS[workload]
    if kind == "charlm":
        from jaxlstm import training
        from jaxlstm.app import charlm

        text = charlm.load_text(None)
        cfg = charlm.Config(output_transform=seed_cell)
        if quick:
            cfg = charlm.Config(output_transform=seed_cell, hidden_size=16, embed_dim=8, batch_size=4, seq_len=16)
        cfg.vocab = "".join(sorted(set(text)))
        _, state = charlm._state(cfg)
        step = training.make_train_step(charlm.lm_loss, donate=False)
        batch = charlm.window_batches(charlm.encode(text[:100_000], cfg.vocab), cfg.batch_size, cfg.seq_len, 0)(0)
        fn, args = (lambda s: step(s, batch, jax.random.key(0), None)[1]["loss"]), (state,)
    else:
        import jaxlstm

        B, T, I, H = (2, 8, 4, 8) if quick else (8, 512, 64, 128)
        p = jaxlstm.init_params(jax.random.key(0), I, H, output_transform=seed_cell)
        xs = jax.random.normal(jax.random.key(1), (B, T, I))
        fn = jax.jit(jax.grad(lambda p, x: jnp.sum(jaxlstm.lstm(p, x)[0] ** 2), argnums=(0, 1)))
        args = (p, xs)
    time_calls(fn, args, 2)  # compile and warm up
    n = calls_for(fn, args, 0.05 if quick else 0.5)
    return 1e3 * statistics.median(time_calls(fn, args, n) for _ in range(1 if quick else 5))


def _child(setting: str, workload: str, quick: bool) -> float:
    flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), SETTINGS[setting]) if f)
    env = dict(os.environ, XLA_FLAGS=flags)
    cmd = [sys.executable, __file__, "--child", workload] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=pathlib.Path(__file__).parent)
    if out.returncode != 0:
        raise RuntimeError(f"{setting}, {workload}: {(out.stderr.strip().splitlines() or ['failed'])[-1]}")
    return float(out.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    names = list(next(iter(results["ms"].values())))
    lines = [
        f"`python benchmarks/xla_flags.py{' --quick' if results['quick'] else ''}`: {results['machine']}, "
        f"{results['date']}, {results['rounds']} rounds; ms per call (median over rounds), ratio to XLA's defaults.",
        "",
        "| workload | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for workload, row in results["ms"].items():
        base = statistics.median(row[names[0]])
        cells = [f"{statistics.median(row[n]):.1f} ({statistics.median(row[n]) / base:.2f})" for n in names]
        lines.append(f"| {workload} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a check that it runs: one tiny workload, two settings, one round"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all settings (default 3)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(f"{_measure(args.child, args.quick):.4f}")
        return 0
    rounds = 1 if args.quick else args.rounds
    names = list(SETTINGS)[:2] if args.quick else list(SETTINGS)
    workloads = list(WORKLOADS)[:1] if args.quick else list(WORKLOADS)
    ms: dict = {w: {n: [] for n in names} for w in workloads}
    try:
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for workload in workloads:
                for setting in order:
                    ms[workload][setting].append(_child(setting, workload, args.quick))
            print(f"round {r + 1} of {rounds} done", flush=True)
    except RuntimeError as e:
        print(f"xla_flags.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("xla_flags.py: interrupted; nothing written", file=sys.stderr)
        return 130
    results = dict(
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        date=datetime.date.today().isoformat(),
        quick=args.quick,
        rounds=rounds,
        ms=ms,
    )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(results)
    (out / "xla_flags.md").write_text(text)
    (out / "xla_flags.json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
