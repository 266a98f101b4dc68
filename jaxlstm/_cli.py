"""The ``jaxlstm`` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    import jaxlstm

    B, T, I, H = args.batch, args.steps, args.input_size, args.hidden_size
    kp, kx = jax.random.split(jax.random.key(args.seed))
    for name, transform in (("seed cell", True), ("classic cell", False)):
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
            f"{name:13s} xs {tuple(xs.shape)} -> hiddens {tuple(hs.shape)}, final cell {tuple(final.cell.shape)}; "
            f"first call {compile_s * 1e3:.0f} ms (compiles), then median {times[2] * 1e3:.2f} ms "
            f"on {jax.devices()[0].platform}"
        )
    return 0


def _train(args: argparse.Namespace) -> int:
    import pathlib

    from . import charlm

    cfg = charlm.Config(
        embed_dim=args.embed_dim,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=args.steps,
        learning_rate=args.lr,
        seed=args.seed,
        eval_every=args.eval_every,
        save_every=args.save_every,
        output_transform=not args.classic,
        text=args.text,
    )
    charlm.train(cfg, pathlib.Path(args.out), resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from . import charlm

    print(charlm.generate(args.checkpoint, args.prompt, args.length, args.temperature, args.seed))
    return 0


def _positive(kind):
    def parse(value):
        v = kind(value)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive; received {value}")
        return v

    return parse


def main(argv=None) -> int:
    from .charlm import Config

    parser = argparse.ArgumentParser(prog="jaxlstm", description="The seed LSTM in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = Config()
    train = sub.add_parser(
        "train",
        help="train a character language model (default: the embedded Shakespeare corpus)",
        description="Train a character-level LSTM language model. With no arguments it trains on the embedded "
        "Shakespeare corpus and reports held-out bits per character.",
    )
    train.add_argument("--text", default=None, help="a UTF-8 text file (default: embedded Shakespeare)")
    train.add_argument("--out", default="runs/charlm", help="run folder (default: runs/charlm)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    train.add_argument("--steps", type=_positive(int), default=d.steps)
    train.add_argument("--batch-size", type=_positive(int), default=d.batch_size)
    train.add_argument("--seq-len", type=_positive(int), default=d.seq_len)
    train.add_argument("--hidden-size", type=_positive(int), default=d.hidden_size)
    train.add_argument("--embed-dim", type=_positive(int), default=d.embed_dim)
    train.add_argument("--layers", type=_positive(int), default=d.num_layers)
    train.add_argument("--lr", type=_positive(float), default=d.learning_rate)
    train.add_argument("--seed", type=int, default=d.seed)
    train.add_argument("--eval-every", type=_positive(int), default=d.eval_every)
    train.add_argument("--save-every", type=_positive(int), default=d.save_every)
    train.add_argument("--classic", action="store_true", help="the classic cell (tanh(c)) instead of the seed cell")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)
    gen = sub.add_parser("generate", help="sample text from a trained run")
    gen.add_argument("--checkpoint", required=True, help="a run folder written by jaxlstm train (its --out)")
    gen.add_argument("--prompt", default="")
    gen.add_argument("--length", type=_positive(int), default=500)
    gen.add_argument("--temperature", type=_positive(float), default=0.8)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_generate)
    demo = sub.add_parser("demo", help="run one layer on random data and print shapes and timing")
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--steps", type=int, default=100)
    demo.add_argument("--input-size", type=int, default=32)
    demo.add_argument("--hidden-size", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    from .charlm import RunError

    try:
        return args.func(args)
    except RunError as e:
        print(f"jaxlstm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
