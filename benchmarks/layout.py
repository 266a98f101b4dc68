"""Which layout the forward scan should run in, per size: the evidence for ``jaxlstm._feature_major``'s thresholds.

    python benchmarks/layout.py            # the grid below (about 5-10 minutes on 2 CPU cores)
    python benchmarks/layout.py --quick    # two small sizes

For each size (B, T, I, H) and cell, three forward passes (no gradient),
compiled, warmed up and timed in alternating rounds (medians):

* ``row``: states ``(B, H)``, the layout of the training forward;
* ``feature, [a; x]``: states ``(H, B)``, one matmul of ``W^T [a; x]`` per step;
* ``feature, two``: states ``(H, B)``, ``W_h^T a + W_x^T x`` per step.

and which of them ``jaxlstm.lstm`` takes there. Writes ``<out>/layout.md``
and ``layout.json``; ratios below 1 are faster than ``row``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import sys

import jax
import jax.numpy as jnp
from timing import block, calls_for, time_calls

import jaxlstm
from jaxlstm import _feature_major, _scan

GRID = [
    (4, 256, 64, 512),
    (8, 256, 256, 512),
    (16, 128, 128, 512),
    (32, 256, 128, 512),
    (64, 64, 256, 512),
    (128, 64, 256, 512),
    (32, 128, 256, 1024),
    (128, 64, 512, 1024),
    (8, 256, 128, 256),
    (16, 128, 256, 256),
    (32, 128, 128, 256),
    (64, 128, 256, 256),
    (128, 64, 128, 256),
    (16, 256, 64, 128),
    (64, 128, 128, 128),
]
QUICK_GRID = [(16, 32, 16, 256), (16, 32, 16, 64)]
VARIANTS = ("row", "feature, [a; x]", "feature, two")


def _traced_with(settings: dict, fn):
    """``fn`` jit-compiled with ``jaxlstm._feature_major``'s module settings replaced while it is traced."""

    def run(*args):
        saved = {k: getattr(_feature_major, k) for k in settings}
        for k, v in settings.items():
            setattr(_feature_major, k, v)
        try:
            return fn(*args)
        finally:
            for k, v in saved.items():
                setattr(_feature_major, k, v)

    return jax.jit(run)


def _forwards(B):
    def forward(p, xs, state):
        return _scan.plain_forward(p, xs, state, None, None, False, 1)[0]

    anywhere = dict(MIN_HIDDEN={jax.default_backend(): 1}, MIN_BATCH=1)
    return {
        "row": _traced_with(dict(MIN_HIDDEN={}), forward),
        "feature, [a; x]": _traced_with(dict(anywhere, TWO_MATMULS_BATCHES=(0, 0)), forward),
        "feature, two": _traced_with(dict(anywhere, TWO_MATMULS_BATCHES=(0, B + 1)), forward),
    }


def bench(size, seed_cell: bool, rounds: int) -> dict:
    B, T, I, H = size
    p = jaxlstm.init_params(jax.random.key(0), I, H, output_transform=seed_cell)
    xs = jax.random.normal(jax.random.key(1), (T, B, I), jnp.float32)
    state = jaxlstm.zero_state(p, batch_shape=(B,))
    fns = _forwards(B)
    args = (p, xs, state)
    for fn in fns.values():
        block(fn(*args))
        block(fn(*args))
    calls = {name: calls_for(fn, args) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in order[r % 3 :] + order[: r % 3]:
            times[name].append(time_calls(fns[name], args, calls[name]))
    med = {name: statistics.median(t) for name, t in times.items()}
    if _feature_major.applies(p, xs):
        chosen = "feature, two" if _feature_major.uses_two_matmuls(B) else "feature, [a; x]"
    else:
        chosen = "row"
    ms = {k: v * 1e3 for k, v in med.items()}
    return dict(size=list(size), cell="output-map" if seed_cell else "classic", ms=ms, chosen=chosen)


def table(results: dict) -> str:
    lines = [
        f"`python benchmarks/layout.py`: {results['machine']}, {results['date']}, jax {results['jax']}, "
        f"{results['rounds']} rounds; forward ms (median), ratio to `row` (below 1 is faster); "
        "**bold**: what `jaxlstm.lstm` takes there.",
        "",
        "| B, T, I, H | cell | " + " | ".join(VARIANTS) + " |",
        "|---|---|" + "---:|" * len(VARIANTS),
    ]
    for r in results["rows"]:
        base = r["ms"]["row"]
        cells = []
        for v in VARIANTS:
            text = f"{r['ms'][v]:.2f} ({r['ms'][v] / base:.2f})"
            cells.append(f"**{text}**" if v == r["chosen"] else text)
        lines.append(f"| {', '.join(map(str, r['size']))} | {r['cell']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small sizes, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per size (default 7, quick 3)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    grid = QUICK_GRID if args.quick else GRID
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    rounds = args.rounds or (3 if args.quick else 7)
    results = dict(
        machine=f"{platform.machine()}, {jax.devices()[0].device_kind}",
        date=datetime.date.today().isoformat(),
        jax=jax.__version__,
        rounds=rounds,
        rows=[],
    )
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        for size in grid:
            for seed_cell in (False, True):
                results["rows"].append(bench(size, seed_cell, rounds))
                print(table(dict(results, rows=results["rows"][-1:])).splitlines()[-1], flush=True)
                (args.out / "layout.json").write_text(json.dumps(results, indent=1))
                (args.out / "layout.md").write_text(table(results))
    except KeyboardInterrupt:
        print("\ninterrupted: keeping the sizes measured so far", file=sys.stderr)
    (args.out / "layout.md").write_text(table(results))
    print(table(results))
    print(f"written: {args.out / 'layout.md'}, layout.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
