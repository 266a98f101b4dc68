"""Streaming inference latency: the main job's model fed one character per stream per call.

    python benchmarks/serving.py            # B = 1 and B = 32, tables in benchmarks/results/serving.{md,json}
    python benchmarks/serving.py --quick    # a smoke run (tiny model, few calls)
    python benchmarks/serving.py --classic  # the classic cell: ONNX's own LSTM operator as one more path

The model is the main job's (``jaxlstm train`` with no arguments: embedding,
LSTM, dense head, sizes from :class:`jaxlstm.app.charlm.Config`) with random
weights: a step's latency does not depend on their values. Each path runs the
same step, tokens ``(B, 1)`` and the state ``(layers, B, H)`` in, logits and
the new state out, the state fed back each call:

* ``jaxlstm Stepper``: :class:`jaxlstm.Stepper` over the Flax model (jitted
  once, the state's buffers donated);
* ``jax.export artifact``: what ``jaxlstm export --format stablehlo`` writes,
  deserialized and called under ``jax.jit``;
* ``onnxruntime``: what ``jaxlstm export`` writes, in an onnxruntime session
  (its default threads) with the state passed as NumPy arrays;
* ``onnxruntime, LSTM operator`` (``--classic`` only): what ``jaxlstm export --format onnx-lstm``
  writes, each layer ONNX's own ``LSTM`` operator (onnxruntime's fused kernel);
* ``PyTorch nn.LSTM``: the same sizes in PyTorch (the classic cell: PyTorch has
  no output map), ``torch.inference_mode``, the ``(h, c)`` state carried.

Rounds alternate the paths after a warm-up; each call is timed alone (the
result waited for); the table gives the median and the 99th percentile per
call and each path's median against the fastest.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))

from charlm_torch import build as build_torch  # noqa: E402
from timing import cpu_model  # noqa: E402


def _paths(cfg, batch: int, vocab: str, tmp: pathlib.Path) -> dict:
    import jax
    import jax.numpy as jnp
    from jax import export as jax_export

    import jaxlstm
    from jaxlstm.app import export as app_export
    from jaxlstm.app.model import build

    model = build(cfg)
    V, L, H = len(vocab), cfg.num_layers, cfg.hidden_size
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), deterministic=True)["params"]
    serve = app_export.serving_function(model, params)
    zeros = np.zeros((L, batch, H), np.float32)
    tokens = np.arange(batch, dtype=np.int32).reshape(batch, 1) % V
    paths = {}

    def stepper_step(state, tok):
        logits, cell, hidden = serve(tok, *state)
        return (cell, hidden), logits

    stepper = jaxlstm.Stepper(stepper_step, (jnp.asarray(zeros), jnp.asarray(zeros)), batch_axis=1)
    tok_j = jnp.asarray(tokens)
    paths["jaxlstm Stepper"] = lambda: stepper(tok_j)

    app_export.export_stablehlo(model, params, vocab, tmp / "model.jaxexport")
    exported = jax_export.deserialize(bytearray((tmp / "model.jaxexport").read_bytes()))
    call = jax.jit(exported.call, donate_argnums=(1, 2))
    hlo_state = [jnp.asarray(zeros), jnp.asarray(zeros)]

    def hlo_step():
        logits, c, h = call(tok_j, *hlo_state)
        hlo_state[:] = [c, h]
        return logits

    paths["jax.export artifact"] = hlo_step

    try:
        import onnxruntime as ort

        def ort_path(path: pathlib.Path):
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(str(path), options)
            ort_state = {"cell": zeros.copy(), "hidden": zeros.copy()}

            def ort_step():
                logits, c, h = session.run(None, {"tokens": tokens, **ort_state})
                ort_state["cell"], ort_state["hidden"] = c, h
                return logits

            return ort_step

        app_export.export_onnx(model, params, vocab, tmp / "model.onnx")
        paths["onnxruntime"] = ort_path(tmp / "model.onnx")
        if not cfg.output_transform:  # the classic cell maps onto ONNX's own LSTM operator too
            app_export.export_onnx_lstm(model, params, vocab, tmp / "model_lstm.onnx")
            paths["onnxruntime, LSTM operator"] = ort_path(tmp / "model_lstm.onnx")
    except ImportError:
        print("onnxruntime or jax2onnx is not installed (pip install 'jaxlstm[export]'): skipped", file=sys.stderr)

    try:
        import torch

        torch.manual_seed(0)
        net = build_torch(V, cfg).eval()
        t_tokens = torch.as_tensor(tokens, dtype=torch.long)
        t_state = [(torch.zeros(L, batch, H), torch.zeros(L, batch, H))]

        def torch_step():
            with torch.inference_mode():
                logits, state = net(t_tokens, t_state[0])
            t_state[0] = state
            return logits

        paths["PyTorch nn.LSTM"] = torch_step
    except ImportError:
        print("torch is not installed: the PyTorch row is skipped", file=sys.stderr)
    return paths


def _wait(out):
    import jax

    return jax.block_until_ready(out) if not isinstance(out, (np.ndarray, list)) and not hasattr(out, "detach") else out


def measure(paths: dict, rounds: int, calls: int, warmup: int) -> dict:
    times: dict[str, list[float]] = {name: [] for name in paths}
    for fn in paths.values():
        for _ in range(warmup):
            _wait(fn())
    for _ in range(rounds):
        for name, fn in paths.items():  # alternating: each path sees the same noise
            for _ in range(calls):
                t0 = time.perf_counter()
                _wait(fn())
                times[name].append(time.perf_counter() - t0)
    return {
        name: {"median_us": statistics.median(ts) * 1e6, "p99_us": float(np.percentile(ts, 99)) * 1e6, "n": len(ts)}
        for name, ts in times.items()
    }


def table(result: dict) -> str:
    flags = (" --quick" if result["quick"] else "") + (" --classic" if result.get("classic") else "")
    cells = "the classic cell" if result.get("classic") else "jaxlstm: the output-map cell; PyTorch: the classic cell"
    lines = [
        "# Streaming inference: one character per stream per call",
        "",
        f"`python benchmarks/serving.py{flags}` on {result['cpu']}; "
        f"model: embedding {result['embed_dim']}, LSTM {result['hidden_size']} x {result['num_layers']} "
        f"({cells}), vocabulary {result['vocab']}; "
        f"{result['rounds']} alternating rounds of {result['calls']} calls per path after warm-up.",
        "",
    ]
    for batch, rows in result["batches"].items():
        fastest = min(r["median_us"] for r in rows.values())
        lines += [
            f"## B = {batch}",
            "",
            "| path | median µs/step | p99 µs/step | vs fastest |",
            "|---|---:|---:|---:|",
        ]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['median_us']:.0f} | {r['p99_us']:.0f} | {r['median_us'] / fastest:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Per-step latency of streaming inference, side by side.")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a tiny model, few calls")
    parser.add_argument("--batches", default="1,32", help="comma-separated stream counts (default 1,32)")
    parser.add_argument(
        "--classic", action="store_true", help="the classic cell, which adds ONNX's own LSTM operator as a path"
    )
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for serving.md and serving.json")
    args = parser.parse_args(argv)

    import dataclasses

    from jaxlstm.app import charlm

    vocab = "".join(chr(32 + k) for k in range(65))  # the main job's vocabulary size (65 characters)
    cfg = dataclasses.replace(charlm.Config(), vocab=vocab, output_transform=not args.classic)
    if args.quick:
        cfg = dataclasses.replace(cfg, hidden_size=16, embed_dim=8)
    rounds, calls, warmup = (2, 5, 3) if args.quick else (10, 100, 50)
    batches = [int(b) for b in args.batches.split(",")]
    result = {
        "cpu": cpu_model(),
        "quick": args.quick,
        "classic": args.classic,
        "embed_dim": cfg.embed_dim,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "vocab": len(vocab),
        "rounds": rounds,
        "calls": calls,
        "batches": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for b in batches:
            paths = _paths(cfg, b, vocab, pathlib.Path(tmp))
            result["batches"][str(b)] = measure(paths, rounds, calls, warmup)
            print(
                f"B = {b}: " + ", ".join(f"{k} {v['median_us']:.0f} µs" for k, v in result["batches"][str(b)].items())
            )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = ("serving_quick" if args.quick else "serving") + ("_classic" if args.classic else "")
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
