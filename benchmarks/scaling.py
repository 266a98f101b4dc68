"""The main job's training step on one device, on N CPU devices, in two processes, and PyTorch's, side by side.

    python benchmarks/scaling.py                  # the main job's model; 7 rounds of 10 steps each
    python benchmarks/scaling.py --classic        # the classic cell (PyTorch's nn.LSTM has only that one)
    python benchmarks/scaling.py --quick          # a smoke run (tiny model, few steps)

Each setting runs in a process of its own, started once (JAX fixes its devices
at start-up): ``jaxlstm`` with one CPU device; with ``--devices`` CPU devices
in one process; as two processes of one CPU device each, joined on localhost
through JAX's distributed runtime (gloo collectives); and PyTorch's
``nn.LSTM`` on the same batches (``benchmarks/charlm_torch.py``'s step, all
cores). Every jaxlstm setting runs ``jaxlstm.training.fit`` itself, the loop
``jaxlstm train`` runs (batches fed to the mesh, the step, the per-step
agreement of the processes; no checkpoints or evaluations), with the host
memory setting that ``jaxlstm train`` makes (``training.reuse_host_memory()``);
the ``--devices`` setting runs once more with the C library's defaults
(``--allocator system``). PyTorch runs as ``charlm_torch.py`` runs, and once
more with the same memory setting as jaxlstm's. After a warm-up
round (compilation), the settings take turns: one round of ``--steps`` steps
each, ``--rounds`` times; the table gives each setting's median seconds per
step and its ratio to PyTorch's and to one device's. Only one setting runs at
a time: the machine's cores are never shared between two of them.

Then, on paper: the bytes a data-parallel step all-reduces (the float32
gradient of every parameter) against the step's arithmetic, for the main
job's model and for H = 1024 and 2048, and the efficiency data parallelism
should reach on 8, 64 and 512 accelerators at the stated sustained speed and
interconnect bandwidths (a ring all-reduce, not overlapped with the backward
pass: a floor).

Writes ``scaling.json`` and ``scaling.md`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time

from timing import cpu_model

RESULTS = pathlib.Path(__file__).parent / "results"
HERE = pathlib.Path(__file__).parent


def config(quick: bool, classic: bool):
    from jaxlstm.app import charlm

    cfg = charlm.Config(embed_dim=8, hidden_size=32, seq_len=16, batch_size=8) if quick else charlm.Config()
    cfg.output_transform = not classic
    text = charlm.load_text(None)
    cfg.vocab = "".join(sorted(set(text)))
    return cfg, (text[:50_000] if quick else text)


# ------------------------------------------------------------------ workers (one per setting)


def allocator(a) -> None:
    """``--allocator reuse``: the C library keeps freed memory, as ``jaxlstm train`` sets it (before JAX or
    PyTorch allocates)."""
    if a.allocator == "reuse":
        from jaxlstm.training import reuse_host_memory

        if not reuse_host_memory():
            print("scaling.py: reuse_host_memory() does not apply on this system", file=sys.stderr)


def jax_worker(a) -> None:
    allocator(a)
    import jax

    if a.process_id is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"localhost:{a.port}", 2, a.process_id, initialization_timeout=120, heartbeat_timeout_seconds=30
        )
    else:
        jax.config.update("jax_num_cpu_devices", a.cpu_devices)
    from jaxlstm import training
    from jaxlstm.app import charlm

    cfg, text = config(a.quick, a.classic)
    train_text, _ = charlm.split_text(text, cfg.seq_len)
    batches = charlm.training_batches(cfg, charlm.encode(train_text, cfg.vocab))
    model, state = charlm._state(cfg)
    step_fn = training.make_train_step(charlm.lm_loss)
    mesh = training.data_mesh() if jax.device_count() > 1 else None
    rng = jax.random.key(cfg.seed + 2)

    def steps(state, n: int):
        return training.fit(
            state,
            step_fn,
            batches,
            num_steps=int(state.step) + n,
            rng=rng,
            progress=False,
            log_every=n,
            mesh=mesh,
            handle_signals=False,
        ).state

    serve(lambda s, n: steps(s, n), state)


def torch_worker(a) -> None:
    allocator(a)
    import charlm_torch

    cfg, text = config(a.quick, a.classic)
    model, opt, batches, lr, _ = charlm_torch.setup(cfg, text)
    batches(0)

    def steps(state, n: int):
        step, carry = state
        for k in range(n):
            carry = charlm_torch.train_step(model, opt, batches, lr, step + k, carry, cfg)
        return step + n, carry

    serve(steps, (0, None))


def serve(steps, state) -> None:
    """Answer each line ``N`` on stdin with the seconds that ``N`` steps took (one JSON line)."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        n = int(line)
        t0 = time.perf_counter()
        state = steps(state, n)
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)


# ------------------------------------------------------------------ the side by side


class Setting:
    def __init__(self, name: str, commands: list[list[str]], env: dict):
        self.name = name
        self.procs = [
            subprocess.Popen(c, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for c in commands
        ]
        self.per_step: list[float] = []

    def _answers(self) -> list[dict]:
        out = []
        for p in self.procs:
            while True:
                line = p.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    raise RuntimeError(f"{self.name}: the worker ended (exit code {p.wait()})")
                if line.startswith("{"):  # not the runtime's own lines (gloo greets on stdout)
                    break
            out.append(json.loads(line))
        return out

    def ready(self) -> None:
        self._answers()

    def run(self, n: int) -> float:
        for p in self.procs:
            p.stdin.write(f"{n}\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        return max(a["seconds"] for a in self._answers())  # the slower process sets the pace

    def close(self) -> None:
        for p in self.procs:
            p.stdin.close()  # type: ignore[union-attr]
            p.wait(timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(a) -> list[Setting]:
    me = [sys.executable, str(pathlib.Path(__file__).absolute())]
    flags = (["--quick"] if a.quick else []) + (["--classic"] if a.classic else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    port = str(free_port())
    reuse, system = ["--allocator", "reuse"], ["--allocator", "system"]
    out = [
        Setting("jaxlstm, 1 CPU device", [[*me, "--worker", "jax", "--cpu-devices", "1", *reuse, *flags]], env),
        Setting(
            f"jaxlstm, {a.devices} CPU devices in 1 process",
            [[*me, "--worker", "jax", "--cpu-devices", str(a.devices), *reuse, *flags]],
            env,
        ),
        Setting(
            f"jaxlstm, {a.devices} CPU devices in 1 process, --allocator system",
            [[*me, "--worker", "jax", "--cpu-devices", str(a.devices), *system, *flags]],
            env,
        ),
        Setting(
            "jaxlstm, 2 processes x 1 CPU device",
            [[*me, "--worker", "jax", "--process-id", str(i), "--port", port, *reuse, *flags] for i in (1, 0)],
            env,
        ),
    ]
    if not a.no_torch:
        out.append(Setting(TORCH, [[*me, "--worker", "torch", *system, *flags]], env))
        out.append(Setting(TORCH_REUSE, [[*me, "--worker", "torch", *reuse, *flags]], env))
    return out


TORCH = "PyTorch nn.LSTM (classic cell)"
TORCH_REUSE = "PyTorch nn.LSTM (classic cell), memory kept as jaxlstm's"


# ------------------------------------------------------------------ on paper


def projection(hidden_sizes=(384, 1024, 2048)) -> list[dict]:
    """Bytes all-reduced and arithmetic per data-parallel step, and the efficiency they allow."""
    from jaxlstm.app import charlm

    d = charlm.Config()
    V = len(set(charlm.load_text(None)))  # the embedded corpus's characters
    E, T, B = d.embed_dim, d.seq_len, d.batch_size
    sustained = 20e12  # FLOP/s one accelerator sustains on this step (a stated assumption)
    links = {8: 100e9, 64: 25e9, 512: 25e9}  # bytes/s per device: in one node (8), over a 200 Gb/s fabric beyond
    latency = 10e-6  # seconds per all-reduce hop
    rows = []
    for H in hidden_sizes:
        lstm = 4 * H * (H + E) + 4 * H + H * H + H  # four gate blocks on [a, x], their biases, the output map
        params = V * E + lstm + H * V + V
        macs_per_token = 4 * H * (H + E) + H * H + H * V
        flops = 6 * macs_per_token * B * T  # forward 2, backward 4 per multiply-add
        compute_s = flops / sustained
        grad_bytes = 4 * params
        row = {"hidden_size": H, "params": params, "allreduce_bytes": grad_bytes, "step_flops": flops}
        row["flops_per_byte"] = flops / grad_bytes
        for n, bw in links.items():
            comm = 2 * (n - 1) / n * grad_bytes / bw + 2 * math.log2(n) * latency
            row[f"efficiency_{n}"] = compute_s / (compute_s + comm)
        rows.append(row)
    return rows


def table(result: dict) -> str:
    lines = [
        "# The main job's training step: devices, processes, PyTorch",
        "",
        f"`python benchmarks/scaling.py{' --classic' if result['classic'] else ''}` on {result['cpu']} "
        f"({result['cores']} cores), {result['rounds']} rounds of {result['steps']} steps, medians. "
        f"Cell: {'classic' if result['classic'] else 'output map (default)'}; batch {result['batch']} x "
        f"{result['seq_len']}, H = {result['hidden_size']}.",
        "",
        "Every jaxlstm setting but the one marked keeps freed memory for reuse (`reuse_host_memory()`, what "
        "`jaxlstm train` sets); PyTorch runs once as `benchmarks/charlm_torch.py` runs and once with the same setting.",
        "",
        "| setting | s / step | steps / s | vs 1 device | vs PyTorch | vs PyTorch, memory kept |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = result["rows"]
    one = rows[0]["median_s"]
    torch_s = next((r["median_s"] for r in rows if r["name"] == TORCH), None)
    torch_reuse_s = next((r["median_s"] for r in rows if r["name"] == TORCH_REUSE), None)
    for r in rows:
        vs_torch = f"{r['median_s'] / torch_s:.2f}x time" if torch_s else "-"
        vs_reuse = f"{r['median_s'] / torch_reuse_s:.2f}x time" if torch_reuse_s else "-"
        lines.append(
            f"| {r['name']} | {r['median_s']:.4f} | {1 / r['median_s']:.2f} | {one / r['median_s']:.2f}x speed-up "
            f"| {vs_torch} | {vs_reuse} |"
        )
    lines += [
        "",
        "## On paper: data parallelism on accelerators",
        "",
        "The main job's batch (32 x 128 characters) on every device; each step all-reduces the float32 gradient. "
        "Assumed: 20 TFLOP/s sustained per device on this step; 100 GB/s per device within a node of 8, "
        "25 GB/s (200 Gb/s) beyond; 10 us per all-reduce hop; no overlap with the backward pass.",
        "",
        "| H | parameters | all-reduced per step | arithmetic per step | FLOP per byte | 8 | 64 | 512 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["projection"]:
        lines.append(
            f"| {p['hidden_size']} | {p['params']:,} | {p['allreduce_bytes'] / 2**20:.1f} MiB | "
            f"{p['step_flops'] / 1e9:.0f} GFLOP | {p['flops_per_byte']:.0f} | {p['efficiency_8']:.0%} | "
            f"{p['efficiency_64']:.0%} | {p['efficiency_512']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="steps per round and setting (default 10)")
    p.add_argument("--rounds", type=int, default=7, help="rounds after the warm-up (default 7)")
    p.add_argument("--devices", type=int, default=2, help="CPU devices of the one-process setting (default 2)")
    p.add_argument("--classic", action="store_true", help="the classic cell (default: the output-map cell)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny model, 2 rounds of 2 steps")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS, help="where to write scaling.json and scaling.md")
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--cpu-devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", default=None, help=argparse.SUPPRESS)
    p.add_argument("--allocator", choices=["reuse", "system"], default="reuse", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker == "jax":
        jax_worker(a)
        return 0
    if a.worker == "torch":
        torch_worker(a)
        return 0
    if a.steps < 1 or a.rounds < 1 or a.devices < 1:
        p.error("--steps, --rounds and --devices must be at least 1")
    if a.quick:
        a.steps, a.rounds = 2, 2
    if not a.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            a.no_torch = True
            print("scaling.py: PyTorch is not installed: its row is left out", file=sys.stderr)
    cfg, _ = config(a.quick, a.classic)
    runs = settings(a)
    try:
        for s in runs:
            s.ready()
        for s in runs:  # warm-up: compilation and the first steps
            s.run(a.steps)
        for r in range(a.rounds):
            for s in runs:
                s.per_step.append(s.run(a.steps) / a.steps)
            print(
                f"round {r + 1}/{a.rounds}: " + ", ".join(f"{s.name} {s.per_step[-1]:.4f} s" for s in runs), flush=True
            )
    except KeyboardInterrupt:
        print("scaling.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"scaling.py: error: {e}; nothing was written", file=sys.stderr)
        return 1
    finally:
        for s in runs:
            for proc in s.procs:
                if proc.poll() is None:
                    proc.kill()
    result = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "classic": a.classic,
        "quick": a.quick,
        "steps": a.steps,
        "rounds": a.rounds,
        "batch": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "hidden_size": cfg.hidden_size,
        "rows": [{"name": s.name, "median_s": statistics.median(s.per_step), "per_step_s": s.per_step} for s in runs],
        "projection": projection(),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    stem = "scaling_classic" if a.classic else "scaling"
    (a.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (a.out / f"{stem}.md").write_text(table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
