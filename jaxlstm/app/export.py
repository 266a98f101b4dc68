"""A trained character model handed to another runtime: ONNX (onnxruntime, no JAX) or a serialized
``jax.export`` artifact (StableHLO), for any batch size and length.

The interface of both (``layers`` = the stack's layers, one direction each):

* inputs ``tokens`` int32 ``(B, T)``, ``cell`` and ``hidden`` float32 ``(layers, B, H)``;
* outputs ``logits`` float32 ``(B, T, V)``, ``cell_out`` and ``hidden_out`` (the state after the last
  step; ONNX names every value of a graph once, so they cannot share the inputs' names).

Feeding the returned state back in continues the streams: ``T = 1`` is one
step at a time. The vocabulary (the characters in id order, a JSON list) is
in the ONNX model's ``metadata_props`` under ``vocabulary``, and in the
StableHLO artifact's companion ``<out>.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pathlib
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

from .. import LSTMState, portable
from .errors import RunError

FORMATS = ("onnx", "onnx-lstm", "stablehlo")
INPUTS = ("tokens", "cell", "hidden")
#: ONNX names each value once in a graph, so the state that comes out is named apart from the one that goes in
OUTPUTS = ("logits", "cell_out", "hidden_out")


def serving_function(model, params) -> Callable:
    """``(tokens, cell, hidden) -> (logits, cell, hidden)`` of a ``CharLM`` with its parameters bound."""

    def serve(tokens, cell, hidden):
        states = tuple(LSTMState(cell[k], hidden[k]) for k in range(model.num_layers))
        logits, finals = model.apply({"params": params}, tokens, states, deterministic=True, return_state=True)
        return logits, jnp.stack([s.cell for s in finals]), jnp.stack([s.hidden for s in finals])

    return serve


def _specs(model, symbols: str = "B, T"):
    from jax import export

    b, t = export.symbolic_shape(symbols)
    state = jax.ShapeDtypeStruct((model.num_layers, b, model.hidden_size), jnp.float32)
    return jax.ShapeDtypeStruct((b, t), jnp.int32), state, state


def export_stablehlo(model, params, vocab: str, out: pathlib.Path) -> list[pathlib.Path]:
    """The serialized ``jax.export`` artifact at ``out`` and its interface and vocabulary at ``out.json``."""
    from jax import export

    exported = export.export(jax.jit(serving_function(model, params)))(*_specs(model))
    meta = out.with_name(out.name + ".json")
    _write(out, bytes(exported.serialize()))
    _write(meta, json.dumps(_interface(model, vocab), indent=1).encode())
    return [out, meta]


def export_onnx(model, params, vocab: str, out: pathlib.Path) -> list[pathlib.Path]:
    """The ONNX model at ``out`` (dynamic batch and time), the vocabulary in its ``metadata_props``."""
    try:
        import onnx  # noqa: F401 - written by _write_onnx; missing, it is named here
        from jax2onnx import to_onnx
    except ImportError as e:
        raise RunError(
            f"exporting to ONNX needs jax2onnx and onnx ({e.name} is missing): pip install 'jaxlstm[export]'."
        ) from None
    serve = serving_function(model, params)
    shapes = [
        jax.ShapeDtypeStruct(("B", "T"), jnp.int32),
        jax.ShapeDtypeStruct((model.num_layers, "B", model.hidden_size), jnp.float32),
        jax.ShapeDtypeStruct((model.num_layers, "B", model.hidden_size), jnp.float32),
    ]
    with _quiet(), portable():
        proto = to_onnx(
            serve,
            shapes,
            model_name="jaxlstm_charlm",
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
        )
    return _write_onnx(proto, model, vocab, out)


def lstm_operator_weights(layer: dict) -> tuple:
    """One classic-cell layer's ``w_x`` ``(I, 4H)``, ``w_h`` ``(H, 4H)``, ``b`` ``(4H,)`` as ONNX ``LSTM``'s
    ``W`` ``(1, 4H, I)``, ``R`` ``(1, 4H, H)`` and ``B`` ``(1, 8H)``.

    jaxlstm's gate blocks are ``[f1 | i | f2 | f3]``: the forget gate, the candidate ``tanh(...)``, the
    input gate and the output gate. ONNX orders them ``i, o, f, c`` (input, output, forget, candidate)
    and keeps each block as rows; its two biases are summed, so the recurrent one is zero here.
    """
    import numpy as np

    w_x, w_h, b = (np.asarray(layer[k], np.float32) for k in ("w_x", "w_h", "b"))
    h = w_h.shape[0]
    order = [2, 3, 0, 1]  # ONNX i, o, f, c = jaxlstm f2, f3, f1, i

    def rows(a):  # (.., 4H) -> (4H, ..) in ONNX's gate order
        return np.concatenate([a[..., k * h : (k + 1) * h] for k in order], axis=-1).T

    bias = np.concatenate([rows(b[None])[:, 0], np.zeros(4 * h, np.float32)])
    return rows(w_x)[None], rows(w_h)[None], bias[None]


def export_onnx_lstm(model, params, vocab: str, out: pathlib.Path) -> list[pathlib.Path]:
    """The classic-cell model as an ONNX graph of ONNX's own ``LSTM`` operator (one per layer), at ``out``.

    The same interface as :func:`export_onnx`; onnxruntime runs each layer as its fused LSTM kernel. Only
    the classic cell maps onto the operator (its output gate is ``tanh(c)``); the learned output map
    ``tanh(W_o c + b_o)`` does not.
    """
    if model.output_transform:
        raise RunError(
            "--format onnx-lstm maps the classic cell (output gate tanh(c)) onto ONNX's LSTM operator; this run "
            "uses the learned output map tanh(W_o c + b_o), which the operator cannot express: use --format onnx."
        )
    try:
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:
        raise RunError(f"exporting to ONNX needs onnx ({e.name} is missing): pip install 'jaxlstm[export]'.") from None
    L, H, V = model.num_layers, model.hidden_size, len(vocab)
    consts: dict[str, np.ndarray] = {
        "embedding": np.asarray(params["Embed_0"]["embedding"], np.float32),
        "kernel": np.asarray(params["Dense_0"]["kernel"], np.float32),
        "bias": np.asarray(params["Dense_0"]["bias"], np.float32),
        "time_axis": np.asarray([1], np.int64),
    }
    node = helper.make_node
    nodes = [
        node("Gather", ["embedding", "tokens"], ["embedded"]),  # (B, T, E)
        node("Transpose", ["embedded"], ["x_0"], perm=[1, 0, 2]),  # (T, B, E): the operator's layout
    ]
    for k in range(L):
        W, R, B = lstm_operator_weights(params["LSTM_0"][f"layer_{k}"])
        consts.update({f"W_{k}": W, f"R_{k}": R, f"B_{k}": B, f"layer_{k}": np.asarray([k], np.int64)})
        nodes += [
            node("Gather", ["cell", f"layer_{k}"], [f"c0_{k}"], axis=0),  # (1, B, H)
            node("Gather", ["hidden", f"layer_{k}"], [f"h0_{k}"], axis=0),
            node(
                "LSTM",
                [f"x_{k}", f"W_{k}", f"R_{k}", f"B_{k}", "", f"h0_{k}", f"c0_{k}"],
                [f"y_{k}", f"h_{k}", f"c_{k}"],
                hidden_size=H,
            ),  # y: (T, 1, B, H)
            node("Squeeze", [f"y_{k}", "time_axis"], [f"x_{k + 1}"]),
        ]
    nodes += [
        node("Transpose", [f"x_{L}"], ["outputs"], perm=[1, 0, 2]),  # (B, T, H)
        node("MatMul", ["outputs", "kernel"], ["projected"]),
        node("Add", ["projected", "bias"], ["logits"]),
        node("Concat", [f"c_{k}" for k in range(L)], ["cell_out"], axis=0),
        node("Concat", [f"h_{k}" for k in range(L)], ["hidden_out"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "jaxlstm_charlm_lstm_operator",
        [
            helper.make_tensor_value_info("tokens", TensorProto.INT32, ["B", "T"]),
            helper.make_tensor_value_info("cell", TensorProto.FLOAT, [L, "B", H]),
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [L, "B", H]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", V]),
            helper.make_tensor_value_info("cell_out", TensorProto.FLOAT, [L, "B", H]),
            helper.make_tensor_value_info("hidden_out", TensorProto.FLOAT, [L, "B", H]),
        ],
        initializer=[numpy_helper.from_array(a, name) for name, a in consts.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="jaxlstm")
    proto.ir_version = 8  # what onnxruntimes from 1.14 on read
    return _write_onnx(proto, model, vocab, out)


def _write_onnx(proto, model, vocab: str, out: pathlib.Path) -> list[pathlib.Path]:
    """``proto`` with the interface and vocabulary in its ``metadata_props``, checked, written whole to ``out``."""
    import onnx

    for key, value in _interface(model, vocab).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto)
    _write(out, proto.SerializeToString())
    return [out]


def _interface(model, vocab: str) -> dict:
    return {
        "vocabulary": json.dumps(list(vocab), ensure_ascii=False),
        "inputs": "tokens int32 (B, T); cell, hidden float32 (layers, B, H)",
        "outputs": "logits float32 (B, T, V); cell_out, hidden_out float32 (layers, B, H)",
        "layers": str(model.num_layers),
        "hidden_size": str(model.hidden_size),
        "cell": "output map (tanh(W_o c + b_o))" if model.output_transform else "classic (tanh(c))",
        "producer": "jaxlstm export",
    }


def _write(path: pathlib.Path, data: bytes) -> None:
    """Whole or not at all: a temporary file in the same folder, renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def _quiet():
    """jax2onnx and onnx_ir log and warn about details of the graph they build; the command says one thing."""
    loggers = [logging.getLogger(n) for n in ("jax2onnx", "onnx_ir", "onnx_ir.serde", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export(run_dir, out, fmt: str = "onnx", *, best: bool = False, log=print) -> list[pathlib.Path]:
    """Export a run's newest intact checkpoint (``best``: its best one) to ``out``; returns the files written."""
    from .charlm import load

    if fmt not in FORMATS:
        raise RunError(f"--format must be one of {', '.join(FORMATS)}; received {fmt!r}.")
    out = pathlib.Path(out)
    if out.is_dir():
        raise RunError(f"--out {out} is a folder; give a file name, e.g. {out / ('model.' + _suffix(fmt))}.")
    if not out.parent.is_dir():
        raise RunError(f"--out: the folder {out.parent} does not exist.")
    model, params, cfg = load(run_dir, log, best=best)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    with jax.enable_x64(False):
        if fmt == "onnx":
            return export_onnx(model, params, cfg.vocab, out)
        if fmt == "onnx-lstm":
            return export_onnx_lstm(model, params, cfg.vocab, out)
        return export_stablehlo(model, params, cfg.vocab, out)


def _suffix(fmt: str) -> str:
    return {"onnx": "onnx", "onnx-lstm": "onnx", "stablehlo": "jaxexport"}[fmt]
