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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxlstm", description="The seed LSTM in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run one layer on random data and print shapes and timing")
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--steps", type=int, default=100)
    demo.add_argument("--input-size", type=int, default=32)
    demo.add_argument("--hidden-size", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
