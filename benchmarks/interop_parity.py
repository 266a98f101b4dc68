"""Worst parity error of each weight converter in ``jaxlstm.interop``.

    python benchmarks/interop_parity.py

For each peer: build the peer's LSTM with random weights, convert, run both on
the same random input (with a random initial state where the peer takes one)
and report the largest absolute difference of the outputs and final states,
in float32 and, where the peer supports it, float64. Peers that are not
installed are reported as skipped. Writes ``interop_parity.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import numpy as np

import jaxlstm
from jaxlstm import interop

B, T, I, H = 4, 50, 16, 32


def rand(shape, dtype, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def worst(*pairs) -> float:
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) for a, b in pairs)


def torch_case(dtype):
    import torch

    torch.manual_seed(0)
    m = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True).to(getattr(torch, dtype))
    x, h0, c0 = rand((B, T, I), dtype, 1), rand((4, B, H), dtype, 2), rand((4, B, H), dtype, 3)
    out, (hn, cn) = m(torch.tensor(x), (torch.tensor(h0), torch.tensor(c0)))
    ys, finals = jaxlstm.lstm_stack(interop.from_torch_lstm(m), jnp.asarray(x), interop.torch_states_to_jax(h0, c0, 2, True))
    hj, cj = interop.jax_states_to_torch(finals)
    return worst((ys, out.detach().numpy()), (hj.numpy(), hn.detach().numpy()), (cj.numpy(), cn.detach().numpy()))


def keras_case(dtype):
    import keras

    layer = keras.layers.LSTM(H, return_sequences=True, return_state=True, dtype=dtype)
    x, h0, c0 = rand((B, T, I), dtype, 4), rand((B, H), dtype, 5), rand((B, H), dtype, 6)
    layer(x)
    layer.set_weights([rand(tuple(w.shape), dtype, 7 + i) * 0.3 for i, w in enumerate(layer.weights)])
    out, hn, cn = layer(x, initial_state=[h0, c0])
    ys, f = jaxlstm.lstm(interop.from_keras(layer), jnp.asarray(x), interop.state_from_hc((h0, c0)))
    return worst((ys, out), (f.hidden, hn), (f.cell, cn))


def flax_case(dtype, name):
    import flax.linen as nn

    rnn = nn.RNN(getattr(nn, name)(H, param_dtype=dtype), return_carry=True)
    x = jnp.asarray(rand((B, T, I), dtype, 8))
    c0, h0 = jnp.asarray(rand((B, H), dtype, 9)), jnp.asarray(rand((B, H), dtype, 10))
    v = rnn.init(jax.random.key(0), x)
    (c, h), out = rnn.apply(v, x, initial_carry=(c0, h0))
    ys, f = jaxlstm.lstm(interop.from_flax_linen(v["params"]["cell"]), x, jaxlstm.LSTMState(c0, h0))
    return worst((ys, out), (f.cell, c), (f.hidden, h))


def nnx_case(dtype, name):
    from flax import nnx

    cell = getattr(nnx, name)(I, H, rngs=nnx.Rngs(0), param_dtype=dtype)
    x = jnp.asarray(rand((B, T, I), dtype, 11))
    c0, h0 = jnp.asarray(rand((B, H), dtype, 12)), jnp.asarray(rand((B, H), dtype, 13))
    (c, h), out = nnx.RNN(cell, return_carry=True)(x, initial_carry=(c0, h0))
    ys, f = jaxlstm.lstm(interop.from_flax_nnx(cell), x, jaxlstm.LSTMState(c0, h0))
    return worst((ys, out), (f.cell, c), (f.hidden, h))


def equinox_case(dtype):
    import equinox as eqx

    cell = eqx.nn.LSTMCell(I, H, dtype=dtype, key=jax.random.key(3))
    x = jnp.asarray(rand((T, I), dtype, 14))
    h0, c0 = jnp.asarray(rand((H,), dtype, 15)), jnp.asarray(rand((H,), dtype, 16))

    def step(carry, xt):
        carry = cell(xt, carry)
        return carry, carry[0]

    (h, c), out = jax.lax.scan(step, (h0, c0), x)
    ys, f = jaxlstm.lstm(interop.from_equinox(cell), x, interop.state_from_hc((h0, c0)))
    return worst((ys, out), (f.cell, c), (f.hidden, h))


def haiku_case(dtype):
    import haiku as hk

    fn = hk.without_apply_rng(
        hk.transform(lambda x, h0, c0: hk.dynamic_unroll(hk.LSTM(H), x, hk.LSTMState(h0, c0), time_major=False))
    )
    x = jnp.asarray(rand((B, T, I), dtype, 17))
    h0, c0 = jnp.asarray(rand((B, H), dtype, 18)), jnp.asarray(rand((B, H), dtype, 19))
    params = fn.init(jax.random.key(0), x, h0, c0)
    out, st = fn.apply(params, x, h0, c0)
    ys, f = jaxlstm.lstm(interop.from_haiku(params), x, interop.state_from_hc((h0, c0)))
    return worst((ys, out), (f.cell, st.cell), (f.hidden, st.hidden))


CASES = {
    "PyTorch nn.LSTM (2 layers, bidirectional)": (torch_case, ("float32", "float64")),
    "Keras 3 LSTM": (keras_case, ("float32",)),  # with dtype="float64" Keras still differed by ~2e-7 here
    "Flax linen LSTMCell": (lambda d: flax_case(d, "LSTMCell"), ("float32", "float64")),
    "Flax linen OptimizedLSTMCell": (lambda d: flax_case(d, "OptimizedLSTMCell"), ("float32", "float64")),
    "Flax NNX LSTMCell": (lambda d: nnx_case(d, "LSTMCell"), ("float32", "float64")),
    "Flax NNX OptimizedLSTMCell": (lambda d: nnx_case(d, "OptimizedLSTMCell"), ("float32", "float64")),
    "Equinox LSTMCell": (equinox_case, ("float32", "float64")),
    "Haiku LSTM": (haiku_case, ("float32", "float64")),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    a = ap.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    lines = [
        f"Worst absolute difference, outputs and final states, B={B}, T={T}, I={I}, H={H}, random weights and initial states.",
        "",
        "| peer | float32 | float64 |",
        "|---|---:|---:|",
    ]
    for name, (fn, dtypes) in CASES.items():
        cells = []
        for d in ("float32", "float64"):
            if d not in dtypes:
                cells.append("n/a")
                continue
            try:
                cells.append(f"{fn(d):.1e}")
            except ImportError as e:
                cells.append(f"skipped ({e.name} not installed)")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
        print(lines[-1])
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "interop_parity.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
