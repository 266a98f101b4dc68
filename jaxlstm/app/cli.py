"""The ``jaxlstm`` command line.

Every failure ends in one line on stderr and a non-zero exit code: 2 for a
problem with the input (options, files, folders, runs), 1 for anything else,
130 / 143 when stopped by SIGINT / SIGTERM. ``JAXLSTM_DEBUG=1`` shows the
traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pathlib
import signal
import sys
import threading
import time

EXIT_INPUT = 2
EXIT_ERROR = 1


def _demo(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    import jaxlstm

    B, T, I, H = args.batch, args.steps, args.input_size, args.hidden_size
    kp, kx = jax.random.split(jax.random.key(args.seed))
    for name, transform in (("output-map cell", True), ("classic cell", False)):
        params = jaxlstm.init_params(kp, I, H, output_transform=transform)
        xs = jax.random.normal(kx, (B, T, I), jnp.float32)
        lengths = jnp.full((B,), T, jnp.int32).at[0].set(T // 2)
        run = jax.jit(lambda p, x, L: jaxlstm.lstm(p, x, seq_lengths=L))
        t0 = time.perf_counter()
        hs, final = jax.block_until_ready(run(params, xs, lengths))
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(run(params, xs, lengths))
            times.append(time.perf_counter() - t0)
        times.sort()
        print(
            f"{name:15s} xs {tuple(xs.shape)} -> hiddens {tuple(hs.shape)}, final cell {tuple(final.cell.shape)}; "
            f"first call {compile_s * 1e3:.0f} ms (compiles), then median {times[2] * 1e3:.2f} ms "
            f"on {jax.devices()[0].platform}"
        )
    return 0


#: train options -> Config fields (the value None means "not given on the command line")
_TRAIN_FIELDS = {
    "text": "text",
    "steps": "steps",
    "batch_size": "batch_size",
    "seq_len": "seq_len",
    "hidden_size": "hidden_size",
    "embed_dim": "embed_dim",
    "layers": "num_layers",
    "lr": "learning_rate",
    "seed": "seed",
    "eval_every": "eval_every",
    "save_every": "save_every",
    "dropout": "dropout_rate",
    "recurrent_dropout": "recurrent_dropout_rate",
    "input_dropout": "input_dropout_rate",
    "weight_decay": "weight_decay",
    "warmup": "warmup_steps",
    "log_every": "log_every",
    "patience": "patience",
}


def _launch(args: argparse.Namespace):
    from .launch import Launch

    return Launch(
        cpu_devices=args.cpu_devices,
        coordinator=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        auto_detect=args.distributed_auto,
        init_timeout=args.init_timeout,
        heartbeat_timeout=args.heartbeat_timeout,
    )


def _train(args: argparse.Namespace) -> int:
    from . import charlm, launch

    options = {field: getattr(args, name) for name, field in _TRAIN_FIELDS.items() if getattr(args, name) is not None}
    if args.classic:
        options["output_transform"] = False
    if args.streams:
        options["streams"] = True
    if args.allocator == "reuse":  # before JAX starts its devices and their threads allocate
        from ..training import reuse_host_memory

        reuse_host_memory()
    how = _launch(args)
    try:
        # the batch size decides the automatic device count: the run's own on --resume
        batch = options.get("batch_size") or _saved_batch_size(args.out, args.resume) or charlm.Config().batch_size
        launch.start(how, batch)
    except launch.LaunchError as e:
        raise charlm.RunError(str(e)) from None
    import jax

    from ..training import data_mesh

    mesh = data_mesh() if jax.device_count() > 1 else None
    stopped_by = charlm.train(
        options,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        # a bar only on a terminal: in a log file or a scheduler's output its frames pile up, so plain lines
        progress=not args.no_progress and sys.stderr.isatty(),
        log=lambda msg: print(msg, flush=True),
        mesh=mesh,
    ).stopped_by
    return 0 if stopped_by is None else 128 + int(stopped_by)


def _saved_batch_size(out: str, resume: bool) -> int | None:
    """The batch size of the run being resumed (None where there is none to read)."""
    if not resume:
        return None
    from . import charlm

    try:
        return charlm.read_config(pathlib.Path(out)).batch_size
    except charlm.RunError:
        return None  # train() reports it


def _generate(args: argparse.Namespace) -> int:
    from . import charlm

    note = lambda msg: print(f"jaxlstm generate: note: {msg}", file=sys.stderr, flush=True)
    temperature = 0.0 if args.greedy else args.temperature
    samples = charlm.generate(
        args.checkpoint,
        args.prompt,
        args.length,
        temperature,
        args.seed,
        log=note,
        top_k=args.top_k,
        top_p=args.top_p,
        num_samples=args.num_samples,
        best=args.best,
    )
    for k, text in enumerate(samples):
        if len(samples) > 1:
            print(f"--- sample {k + 1} of {len(samples)} ---")
        print(text)
    return 0


def _export(args: argparse.Namespace) -> int:
    from . import export

    note = lambda msg: print(f"jaxlstm export: note: {msg}", file=sys.stderr, flush=True)
    fmt = args.format or ("stablehlo" if args.out.endswith((".jaxexport", ".stablehlo")) else "onnx")
    files = export.export(args.checkpoint, args.out, fmt, best=args.best, log=note)
    for f in files:
        print(f"wrote {f}")
    return 0


def _number(kind, *, minimum=None, positive=False, maximum=None, below=None):
    """An argparse type: ``kind`` (int or float), finite, and positive / at least ``minimum`` / at most ``maximum``."""

    def parse(value):
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}; received {value!r}"
            ) from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number; received {value}")
        if positive and v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive; received {value}")
        if minimum is not None and v < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}; received {value}")
        if maximum is not None and v > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}; received {value}")
        if below is not None and v >= below:
            raise argparse.ArgumentTypeError(f"must be below {below}; received {value}")
        return v

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (no usage block) and exit code 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_INPUT)


def build_parser() -> argparse.ArgumentParser:
    from .config import MAX_SEED, Config

    d = Config()
    parser = _Parser(
        prog="jaxlstm",
        description="LSTMs in JAX: the classic cell, and a cell whose output gate applies a learned map "
        "W_o c + b_o to the cell state before the tanh.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser(
        "train",
        help="train a character language model (default: the embedded Shakespeare corpus)",
        description="Train a character-level LSTM language model and report held-out bits per character. "
        "With no arguments it trains on the embedded Shakespeare corpus. Ctrl-C or SIGTERM stops after the "
        "step in flight and saves it; --resume continues the run exactly where it stopped.",
    )
    pos_int = _number(int, positive=True)
    train.add_argument("--text", default=None, help="a UTF-8 text file (default: embedded Shakespeare)")
    train.add_argument("--out", default="runs/charlm", help="run folder (default: runs/charlm)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out exactly (its own settings)")
    train.add_argument(
        "--overwrite", action="store_true", help="replace the run in --out (removes only the files a run writes)"
    )
    train.add_argument(
        "--steps",
        type=pos_int,
        default=None,
        help=f"total steps (default {d.steps}); with --resume a larger value lengthens the run, its learning-rate "
        "schedule unchanged (steps past its end use the final rate)",
    )
    train.add_argument(
        "--batch-size", type=pos_int, default=None, help=f"sequences per training step (default {d.batch_size})"
    )
    train.add_argument("--seq-len", type=pos_int, default=None, help=f"characters per sequence (default {d.seq_len})")
    train.add_argument(
        "--hidden-size", type=pos_int, default=None, help=f"LSTM hidden size H of every layer (default {d.hidden_size})"
    )
    train.add_argument(
        "--embed-dim", type=pos_int, default=None, help=f"character embedding size (default {d.embed_dim})"
    )
    train.add_argument("--layers", type=pos_int, default=None, help=f"stacked LSTM layers (default {d.num_layers})")
    train.add_argument(
        "--lr", type=_number(float, positive=True), default=None, help=f"peak learning rate (default {d.learning_rate})"
    )
    train.add_argument(
        "--seed",
        type=_number(int, minimum=0, maximum=MAX_SEED),
        default=None,
        help=f"seed of initialisation and batches, 0 to {MAX_SEED} (default {d.seed})",
    )
    train.add_argument(
        "--eval-every", type=pos_int, default=None, help=f"steps between held-out evaluations (default {d.eval_every})"
    )
    train.add_argument(
        "--save-every", type=pos_int, default=None, help=f"steps between checkpoints (default {d.save_every})"
    )
    rate = _number(float, minimum=0.0, below=1.0)
    train.add_argument(
        "--dropout", type=rate, default=None, help=f"dropout on the LSTM outputs, in [0, 1) (default {d.dropout_rate})"
    )
    train.add_argument(
        "--input-dropout",
        type=rate,
        default=None,
        help=f"dropout on the embedded characters (the LSTM's input), in [0, 1) (default {d.input_dropout_rate})",
    )
    train.add_argument(
        "--recurrent-dropout",
        type=rate,
        default=None,
        help=f"variational dropout on a^(t-1) inside the recurrence, in [0, 1) (default {d.recurrent_dropout_rate})",
    )
    train.add_argument(
        "--weight-decay",
        type=_number(float, minimum=0.0),
        default=None,
        help=f"AdamW weight decay (default {d.weight_decay})",
    )
    train.add_argument(
        "--warmup",
        type=_number(int, minimum=0),
        default=None,
        help="learning-rate warm-up steps (default: 5%% of --steps)",
    )
    train.add_argument(
        "--log-every",
        type=pos_int,
        default=None,
        help=f"steps per logging interval: metrics.jsonl rows (means over the interval) and, with "
        f"--no-progress, one line each (default {d.log_every})",
    )
    train.add_argument(
        "--patience",
        type=_number(int, minimum=0),
        default=None,
        help="stop after this many evaluations without a better held-out bits/char (default 0: never); "
        "the best state is always kept in <out>/best",
    )
    train.add_argument(
        "--classic",
        action="store_true",
        help="the classic cell (output gate tanh(c)) instead of the default cell with a learned output map "
        "tanh(W_o c + b_o)",
    )
    train.add_argument(
        "--streams",
        action="store_true",
        help="train on contiguous streams whose state carries from one step to the next, instead of the default "
        "independent random windows read from a zero state (can leave the cell state growing without bound "
        "on short runs: compare the held-out figure)",
    )
    train.add_argument(
        "--allocator",
        choices=("reuse", "system"),
        default="reuse",
        help="reuse (default, Linux with glibc): the C library keeps the memory a step frees for the next "
        "step, so XLA's working buffers are not page-faulted afresh on every step (see the speed guide); "
        "system: the C library's own defaults",
    )
    train.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: one plain line per logging interval with the training and held-out bits/char "
        "(the default where stderr is not a terminal)",
    )
    scale = train.add_argument_group(
        "devices and processes",
        "Data parallelism: each batch is split over the devices (and processes), the model replicated. "
        "A run's devices and processes are not part of it: it resumes on any number.",
    )
    scale.add_argument(
        "--cpu-devices",
        type=pos_int,
        default=None,
        help="CPU devices for this process (default: one per core, at most 2, that the batch splits into; "
        "1 in several processes); ignored where JAX uses a GPU or TPU",
    )
    scale.add_argument(
        "--coordinator", default=None, help="HOST:PORT of process 0: several processes train one model together"
    )
    scale.add_argument(
        "--num-processes", type=pos_int, default=None, help="how many processes train together (with --coordinator)"
    )
    scale.add_argument(
        "--process-id",
        type=_number(int, minimum=0),
        default=None,
        help="this process's number, 0 to --num-processes - 1 (0 writes the run's files)",
    )
    scale.add_argument(
        "--distributed-auto",
        action="store_true",
        help="let JAX find the processes and coordinator itself (SLURM, TPU pods, cloud clusters)",
    )
    scale.add_argument(
        "--init-timeout",
        type=pos_int,
        default=300,
        help="seconds to wait for the coordinator and the other processes at start-up (default 300)",
    )
    scale.add_argument(
        "--heartbeat-timeout",
        type=pos_int,
        default=100,
        help="seconds without word from a process before JAX's coordinator gives it up (default 100)",
    )
    train.set_defaults(func=_train)
    gen = sub.add_parser(
        "generate",
        help="sample text from a trained run",
        description="Continue a prompt with characters sampled from a run's newest intact checkpoint.",
    )
    gen.add_argument(
        "--checkpoint",
        "--out",
        dest="checkpoint",
        required=True,
        help="a run folder written by jaxlstm train (its --out; either name works)",
    )
    gen.add_argument(
        "--best",
        action="store_true",
        help="sample from the checkpoint of the best held-out evaluation (<run>/best), not the newest",
    )
    gen.add_argument("--prompt", default="", help="text to continue (default: a newline)")
    gen.add_argument("--length", type=pos_int, default=500, help="characters to generate per sample (default 500)")
    gen.add_argument(
        "--temperature",
        type=_number(float, minimum=0),
        default=0.8,
        help="softmax temperature: lower is more conservative, 0 is greedy (default 0.8)",
    )
    gen.add_argument("--greedy", action="store_true", help="always take the most likely character (temperature 0)")
    gen.add_argument("--top-k", type=pos_int, default=None, help="sample among the k most likely characters only")
    gen.add_argument(
        "--top-p",
        type=_number(float, positive=True, maximum=1.0),
        default=1.0,
        help="nucleus sampling: among the most likely characters holding this probability (default 1.0: all)",
    )
    gen.add_argument(
        "--num-samples", type=pos_int, default=1, help="independent samples, drawn in one batch (default 1)"
    )
    gen.add_argument(
        "--seed",
        type=_number(int, minimum=0, maximum=2**32 - 1),
        default=0,
        help="random seed of the sampling, 0 to 4294967295 (default 0)",
    )
    gen.set_defaults(func=_generate)
    exp = sub.add_parser(
        "export",
        help="write a trained run's model for another runtime (ONNX, or a StableHLO jax.export artifact)",
        description=(
            "Write a run's model for any batch size and length: inputs tokens int32 (B, T), cell and hidden "
            "float32 (layers, B, H); outputs logits (B, T, V), cell_out and hidden_out. Feed the state back in "
            "to continue a stream (T = 1: one character at a time). ONNX runs in onnxruntime without JAX; its "
            "vocabulary is in the model's metadata_props under 'vocabulary'."
        ),
    )
    exp.add_argument(
        "--checkpoint", "--run", dest="checkpoint", required=True, help="a run folder written by jaxlstm train"
    )
    exp.add_argument("--out", required=True, help="the file to write, e.g. model.onnx")
    exp.add_argument(
        "--format",
        choices=("onnx", "onnx-lstm", "stablehlo"),
        default=None,
        help="onnx (needs the export extra: pip install 'jaxlstm[export]'), onnx-lstm (a classic-cell run as "
        "ONNX's own LSTM operator, which onnxruntime runs as one fused kernel; same interface) or stablehlo "
        "(a serialized jax.export artifact, with its interface and vocabulary in <out>.json); default: "
        "stablehlo for a name ending in .jaxexport, onnx otherwise",
    )
    exp.add_argument("--best", action="store_true", help="export the best held-out evaluation's checkpoint")
    exp.set_defaults(func=_export)
    demo = sub.add_parser(
        "demo",
        help="run one layer on random data and print shapes and timing",
        description="Run one LSTM layer of each cell on random data; print shapes, compile time and run time.",
    )
    demo.add_argument("--batch", type=pos_int, default=8, help="sequences per batch (default 8)")
    demo.add_argument("--steps", type=pos_int, default=100, help="time steps (default 100)")
    demo.add_argument("--input-size", type=pos_int, default=32, help="input features (default 32)")
    demo.add_argument("--hidden-size", type=pos_int, default=64, help="hidden size (default 64)")
    demo.add_argument(
        "--seed", type=_number(int, minimum=0, maximum=2**32 - 1), default=0, help="random seed (default 0)"
    )
    demo.set_defaults(func=_demo)
    return parser


def _version() -> str:
    import jaxlstm

    return jaxlstm.__version__


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def setup_process() -> None:
    """What the ``jaxlstm`` process (not a caller of :func:`main`) sets up before running a command.

    Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM (what schedulers send) does the same, until
    ``train`` turns both into a request to stop after the step in flight.
    """
    if not os.environ.get("JAXLSTM_DEBUG"):
        # orbax leaves coroutines behind after failing to read a damaged checkpoint, and logs (with
        # tracebacks, from its threads) what the command reports itself in one line: noise here
        sys.unraisablehook = lambda unraisable: None
        logging.getLogger("absl").setLevel(logging.CRITICAL)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if hasattr(signal, "SIGTERM"):
            signal.signal(signal.SIGTERM, _raise_interrupt)


def main(argv=None, *, pending_signal: int | None = None) -> int:
    """Run the command; ``pending_signal``: a signal that arrived while the launcher imported this module."""
    command = "jaxlstm"
    if pending_signal is not None:
        print(
            f"{command}: stopped by {signal.Signals(pending_signal).name} while starting; nothing was written",
            file=sys.stderr,
        )
        return 128 + pending_signal
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = f"jaxlstm {args.command}"
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{command}: interrupted; checkpoints saved before are kept", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, its message already printed)
        return e.code if isinstance(e.code, int) else 0
    except Exception as e:
        from .charlm import Interrupted, RunError

        if isinstance(e, Interrupted):
            print(f"{command}: {e}", file=sys.stderr)
            return 128 + e.signum
        if isinstance(e, RunError):
            print(f"{command}: error: {e}", file=sys.stderr)
            return EXIT_INPUT
        from ..training import PartnerLost

        if isinstance(e, PartnerLost):
            # the distributed runtime would wait for the lost process at exit (and then abort): end here
            print(f"{command}: error: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(EXIT_ERROR)
        if os.environ.get("JAXLSTM_DEBUG"):
            raise
        kind = "" if isinstance(e, OSError) else f"{type(e).__name__}: "
        print(f"{command}: error: {kind}{_one_line(e)} (set JAXLSTM_DEBUG=1 to see the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    setup_process()
    sys.exit(main())
