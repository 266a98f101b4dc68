"""Lossless weight exchange with PyTorch, Keras 3, Flax (linen and NNX), Equinox and Haiku.

Every peer describes the *classic* LSTM (``h = o * tanh(c)``); in jaxlstm's
names its gates are ``f -> f1``, ``g -> i`` (the candidate), ``i -> f2`` and
``o -> f3``. Layouts:

============  ==========================================  ===========  ==============================
peer          weights                                     gate order   conversion
============  ==========================================  ===========  ==============================
PyTorch       ``weight_ih (4H, I)``, ``weight_hh (4H, H)``,  i f g o      transpose; ``b = b_ih + b_hh``
              ``bias_ih (4H)``, ``bias_hh (4H)``
Keras 3       ``kernel (I, 4H)``, ``recurrent_kernel``     i f c o      reorder blocks
              ``(H, 4H)``, ``bias (4H)``
Flax linen    ``ii/if/ig/io: kernel (I, H)``,              per gate     concatenate blocks
              ``hi/hf/hg/ho: kernel (H, H), bias (H)``
Flax NNX      ``LSTMCell``: as linen (``if_`` for ``if``);  per gate /   as linen / reorder blocks
              ``OptimizedLSTMCell``: ``dense_i (I, 4H)``,  i f g o
              ``dense_h (H, 4H) + bias (4H)``
Equinox       ``weight_ih (4H, I)``, ``weight_hh (4H, H)``,  i f g o      transpose
              ``bias (4H)``
Haiku         ``linear/w (I + H, 4H)`` over ``[x, h]``,    i g f o      split rows; forget bias -1/+1
              ``linear/b (4H)``; adds 1 to ``f`` inside
============  ==========================================  ===========  ==============================

The output-map cell's ``W_o`` cannot be expressed by these formats: exporting
params with ``w_o``/``b_o`` raises, unless ``w_o`` is exactly the identity and
``b_o`` exactly zero (then the cell *is* the classic cell). A projection
(``w_hr``, PyTorch's ``proj_size``: ``weight_hr (P, H)``, ``weight_hh (4H, P)``)
converts to and from PyTorch only. Keras ``Bidirectional(LSTM)`` layers convert
with :func:`from_keras_bidirectional` / :func:`to_keras_bidirectional`.

Carry order: jaxlstm and Flax use ``(cell, hidden)``; PyTorch, Keras, Equinox
and Haiku use ``(hidden, cell)``. :func:`state_to_hc` / :func:`state_from_hc`
and the PyTorch state helpers convert.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_params
from ._checks import describe as _describe
from ._types import GATE_ORDER, BidirectionalParams, BidirectionalState, LSTMParams, LSTMState

__all__ = [
    "from_torch_lstm",
    "to_torch_lstm",
    "from_torch_cell",
    "to_torch_cell",
    "torch_states_to_jax",
    "jax_states_to_torch",
    "from_keras",
    "to_keras",
    "from_keras_bidirectional",
    "to_keras_bidirectional",
    "KERAS_MERGE",
    "from_flax_linen",
    "to_flax_linen",
    "from_flax_nnx",
    "to_flax_nnx",
    "from_equinox",
    "to_equinox",
    "from_haiku",
    "to_haiku",
    "state_to_hc",
    "state_from_hc",
    "as_classic",
]

# Gate blocks are named as in jaxlstm everywhere here (GATE_ORDER): f1 the forget gate, i the tanh
# candidate, f2 the sigmoid scaling the candidate (the peers' "input gate"), f3 the output sigmoid.
_OURS = GATE_ORDER
#: Each peer's block order, in jaxlstm's gate names. PyTorch, Keras (i, f, c, o), Flax and Equinox
#: store i, f, g, o; Haiku stores i, g, f, o.
TORCH_ORDER = ("f2", "f1", "i", "f3")
KERAS_ORDER = TORCH_ORDER
FLAX_ORDER = TORCH_ORDER
EQUINOX_ORDER = TORCH_ORDER
HAIKU_ORDER = ("f2", "i", "f1", "f3")
#: jaxlstm gate -> the letter of Flax's per-gate parameter names (``ii``, ``hf``, ...).
_FLAX_LETTER = {"f2": "i", "f1": "f", "i": "g", "f3": "o"}
#: jaxlstm gate -> Flax NNX ``LSTMCell``'s input-side layer name.
_NNX_INPUT = {"f2": "ii", "f1": "if_", "i": "ig", "f3": "io"}


# ------------------------------------------------------------------ classic-gate core


def _blocks(a, order: Sequence[str], axis: int, what: str = "weights") -> dict:
    a = jnp.asarray(a)
    if a.ndim <= axis % max(a.ndim, 1) or a.shape[axis] == 0 or a.shape[axis] % 4:
        raise ValueError(
            f"{what}: expected an array with 4H entries along axis {axis} (four gate blocks); received shape {a.shape}."
        )
    parts = jnp.split(a, 4, axis=axis)
    return dict(zip(order, parts))


def _get(tree: Mapping, path: Sequence[str], what: str):
    """``tree[path[0]][path[1]]...`` with a message naming the missing entry and what is there."""
    node = tree
    for depth, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            have = sorted(node) if isinstance(node, Mapping) else _describe(node)
            where = "/".join(path[:depth]) or "the top level"
            raise ValueError(f"{what}: no {key!r} under {where} (found {have}); is this the right kind of cell?")
        node = node[key]
    return node


def _join(blocks: Mapping[str, Any], order: Sequence[str], axis: int):
    return jnp.concatenate([jnp.asarray(blocks[g]) for g in order], axis=axis)


def _from_classic(wx: Mapping, wh: Mapping, b: Mapping, what: str = "converter", w_hr: Any = None) -> LSTMParams:
    """Per-gate blocks in row-vector orientation (``wx[g]`` ``(I, H)``, ``wh[g]`` ``(H, H)``, ``b[g]`` ``(H,)``).

    With a projection ``w_hr`` ``(H, P)``, ``wh[g]`` is ``(P, H)``.
    """
    wx, wh, b = ({g: jnp.asarray(m[g]) for g in _OURS} for m in (wx, wh, b))
    h = wh["f1"].shape[-1] if wh["f1"].ndim == 2 else -1
    i = wx["f1"].shape[0] if wx["f1"].ndim == 2 else -1
    p = h if w_hr is None else int(jnp.shape(w_hr)[-1])
    for name, blocks, shape in (("input kernel", wx, (i, h)), ("recurrent kernel", wh, (p, h)), ("bias", b, (h,))):
        for g in _OURS:
            if blocks[g].shape != shape or h < 1 or i < 1:
                raise ValueError(
                    f"{what}: the {name} block of gate {g!r} has shape {blocks[g].shape}; expected {shape} "
                    f"(input size {i}, hidden size {h}). Nothing is broadcast: the weights do not describe one LSTM."
                )
    params = LSTMParams(
        _join(wh, _OURS, 1), _join(wx, _OURS, 1), _join(b, _OURS, 0), w_hr=None if w_hr is None else jnp.asarray(w_hr)
    )
    return check_params(params)


def as_classic(params: LSTMParams) -> LSTMParams:
    """``params`` without the output map, if that map is exactly the identity; else a ``ValueError``.

    Example:
      >>> import jax, jaxlstm
      >>> from jaxlstm.interop import as_classic
      >>> p = jaxlstm.init_params(jax.random.key(0), 3, 4)  # the output-map cell, W_o = I at init
      >>> as_classic(p).output_transform
      False
    """
    check_params(params)
    if params.w_o is None:
        return params
    h = params.hidden_size
    if bool(jnp.all(params.w_o == jnp.eye(h, dtype=params.w_o.dtype))) and bool(jnp.all(params.b_o == 0)):
        return params._replace(w_o=None, b_o=None)
    raise ValueError(
        "these params are a cell with a learned output map tanh(W_o c + b_o); PyTorch, Keras, Flax, "
        "Equinox and Haiku LSTMs only compute tanh(c), so the weights cannot be exported without changing "
        "the model. Train with output_transform=False to exchange weights, or export only when W_o is the "
        "identity and b_o zero."
    )


def _to_classic(params: LSTMParams, allow_projection: bool = False):
    p = as_classic(params)
    if p.w_hr is not None and not allow_projection:
        raise ValueError(
            f"these params project the hidden state to P = {p.output_size} (LSTMP, w_hr); of the peers only "
            "PyTorch's nn.LSTM (proj_size) has a projection. Export them with to_torch_lstm, or build the "
            "layer without proj_size."
        )
    return _blocks(p.w_x, _OURS, 1), _blocks(p.w_h, _OURS, 1), _blocks(p.b, _OURS, 0)


# ------------------------------------------------------------------ states


def state_to_hc(state: LSTMState) -> tuple:
    """jaxlstm/Flax ``(cell, hidden)`` -> ``(hidden, cell)`` as used by PyTorch, Keras, Equinox, Haiku."""
    return (state.hidden, state.cell)


def state_from_hc(hc) -> LSTMState:
    """``(hidden, cell)`` -> :class:`jaxlstm.LSTMState` ``(cell, hidden)``."""
    if not (isinstance(hc, (tuple, list)) and len(hc) == 2):
        raise ValueError(
            f"state_from_hc expects the pair (hidden, cell) that torch.nn.LSTM returns; received {_describe(hc)}."
        )
    h, c = hc
    return LSTMState(jnp.asarray(c), jnp.asarray(h))


# ------------------------------------------------------------------ PyTorch


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "PyTorch is needed for this converter: pip install 'jaxlstm[interop]' (a CPU build is enough)."
        ) from e
    return torch


def _state_dict(src) -> dict:
    if hasattr(src, "state_dict"):
        src = src.state_dict()
    if not isinstance(src, Mapping):
        raise TypeError(f"expected a torch.nn.LSTM (or LSTMCell) or its state_dict(); received {_describe(src)}.")
    return {k: np.asarray(v.detach().cpu().numpy()) if hasattr(v, "detach") else np.asarray(v) for k, v in src.items()}


def _shape_of(sd: dict, key: str, expected: tuple, what: str) -> np.ndarray:
    """``sd[key]``, checked to have ``expected`` shape (``None`` entries match any size)."""
    if key not in sd:
        raise ValueError(f"{what}: the state_dict has no {key!r} (present: {sorted(sd)}).")
    a = sd[key]
    ok = a.ndim == len(expected) and all(e is None or e == n for e, n in zip(expected, a.shape))
    if not ok:
        want = (
            "(" + ", ".join("*" if e is None else str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"
        )
        raise ValueError(f"{what}: {key} has shape {a.shape}; expected {want}. Nothing is broadcast or truncated.")
    return a


def _torch_layer(sd: dict, suffix: str, input_size: int | None = None, what: str = "torch LSTM") -> LSTMParams:
    w_hh = _shape_of(sd, f"weight_hh{suffix}", (None, None), what)
    w_hr = None
    if f"weight_hr{suffix}" in sd:  # proj_size > 0: weight_hh is (4H, P), weight_hr (P, H)
        if w_hh.shape[0] % 4 or w_hh.shape[0] < 4:
            raise ValueError(f"{what}: weight_hh{suffix} has shape {w_hh.shape}; expected (4H, P).")
        h = w_hh.shape[0] // 4
        w_hr = _shape_of(sd, f"weight_hr{suffix}", (w_hh.shape[1], h), what).T
    else:
        h = w_hh.shape[1]
    if h < 1 or w_hh.shape[0] != 4 * h:
        raise ValueError(f"{what}: weight_hh{suffix} has shape {w_hh.shape}; expected (4H, H).")
    w_ih = _shape_of(sd, f"weight_ih{suffix}", (4 * h, input_size), what)
    biases = [k for k in (f"bias_ih{suffix}", f"bias_hh{suffix}") if k in sd]
    if len(biases) == 1:
        missing = ({f"bias_ih{suffix}", f"bias_hh{suffix}"} - set(biases)).pop()
        raise ValueError(f"{what}: {biases[0]} is present but {missing} is missing; give both biases or neither.")
    if biases:
        b = _shape_of(sd, biases[0], (4 * h,), what) + _shape_of(sd, biases[1], (4 * h,), what)
    else:
        b = np.zeros((4 * h,), w_ih.dtype)
    order = TORCH_ORDER
    return _from_classic(_blocks(w_ih.T, order, 1), _blocks(w_hh.T, order, 1), _blocks(b, order, 0), what, w_hr)


_TORCH_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$")


def _layer_number(key: str) -> int:
    m = _TORCH_KEY.match(key)
    return int(m.group(2)) if m else -1


def from_torch_lstm(src) -> tuple:
    """A ``torch.nn.LSTM`` (module or ``state_dict``) -> layers for :func:`jaxlstm.lstm_stack`.

    ``num_layers``, ``bidirectional`` and ``bias`` are read from the weights,
    and every key and shape is checked: a missing or unexpected key, a gap in
    the layer numbers, or a shape that does not fit raises a ``ValueError``
    naming it (nothing is broadcast or dropped).
    ``batch_first`` is not part of the weights: run the layers with
    ``time_major=not batch_first``.

    Returns:
      A tuple of :class:`jaxlstm.LSTMParams` (or :class:`jaxlstm.BidirectionalParams`
      for a bidirectional LSTM), one per layer, in the weights' dtype.
    """
    what = "from_torch_lstm"
    sd = _state_dict(src)
    if not sd:
        raise ValueError(f"{what}: the state_dict is empty; pass a torch.nn.LSTM or its state_dict().")
    unknown = sorted(k for k in sd if not _TORCH_KEY.match(k))
    if unknown:
        raise ValueError(
            f"{what}: unexpected keys {unknown}; a torch.nn.LSTM state_dict holds only weight_ih_lK, weight_hh_lK, "
            "bias_ih_lK, bias_hh_lK, weight_hr_lK with proj_size (and their _reverse twins). "
            "For a torch.nn.LSTMCell use from_torch_cell; "
            "for a model holding an LSTM, pass the LSTM submodule."
        )
    numbers = {_layer_number(k) for k in sd}
    num_layers = max(numbers) + 1
    bidirectional = any(k.endswith("_reverse") for k in sd)
    with_bias = any(k.startswith("bias") for k in sd)
    projected = any(k.startswith("weight_hr") for k in sd)
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if with_bias else [])
    names += ["weight_hr"] if projected else []
    expected = {
        f"{n}_l{k}{d}"
        for k in range(num_layers)
        for n in names
        for d in ([""] + (["_reverse"] if bidirectional else []))
    }
    missing = sorted(expected - set(sd), key=lambda k: (_layer_number(k), k))
    if missing:
        raise ValueError(
            f"{what}: the state_dict describes {num_layers} layer(s){' (bidirectional)' if bidirectional else ''}"
            f"{' with biases' if with_bias else ''} but lacks {missing}. "
            "Pass the complete state_dict of one torch.nn.LSTM."
        )
    layers: list = []
    size, hidden = None, None  # layer k > 0 takes D * H inputs
    for k in range(num_layers):
        directions = [_torch_layer(sd, f"_l{k}", size, what)]
        if bidirectional:
            directions.append(_torch_layer(sd, f"_l{k}_reverse", directions[0].input_size, what))
        hidden = directions[0].hidden_size if hidden is None else hidden
        for p in directions:
            if p.hidden_size != hidden:
                raise ValueError(
                    f"{what}: layer {k} has hidden size {p.hidden_size} where layer 0 has {hidden}; "
                    "the layers of one torch.nn.LSTM share one hidden_size."
                )
        layers.append(BidirectionalParams(*directions) if bidirectional else directions[0])
        size = len(directions) * directions[0].output_size
    return tuple(layers)


def _torch_entries(params: LSTMParams, suffix: str, bias: bool) -> dict:
    wx, wh, b = _to_classic(params, allow_projection=True)
    order = TORCH_ORDER
    out = {
        f"weight_ih{suffix}": np.asarray(_join(wx, order, 1)).T,
        f"weight_hh{suffix}": np.asarray(_join(wh, order, 1)).T,
    }
    b = np.asarray(_join(b, order, 0))
    if bias:
        out[f"bias_ih{suffix}"] = b
        out[f"bias_hh{suffix}"] = np.zeros_like(b)
    elif np.any(b != 0):
        raise ValueError("bias=False was asked for but these params have non-zero biases; export with bias=True.")
    if params.w_hr is not None:
        out[f"weight_hr{suffix}"] = np.asarray(params.w_hr).T
    return out


def _to_tensors(entries: dict):
    torch = _torch()
    return OrderedDict((k, torch.from_numpy(np.array(v, copy=True, order="C"))) for k, v in entries.items())


def to_torch_lstm(layers, *, bias: bool = True) -> OrderedDict:
    """Layers of the functional API -> a ``state_dict`` for ``torch.nn.LSTM``.

    Build the module with the matching ``input_size``, ``hidden_size``,
    ``num_layers``, ``bidirectional``, ``bias`` and ``proj_size``, then
    ``module.load_state_dict(to_torch_lstm(layers))``. The whole bias goes to
    ``bias_ih``; ``bias_hh`` is zero.
    """
    if isinstance(layers, (LSTMParams, BidirectionalParams)):
        layers = (layers,)
    entries = {}
    for k, layer in enumerate(layers):
        if isinstance(layer, BidirectionalParams):
            entries.update(_torch_entries(layer.forward, f"_l{k}", bias))
            entries.update(_torch_entries(layer.backward, f"_l{k}_reverse", bias))
        else:
            entries.update(_torch_entries(layer, f"_l{k}", bias))
    # torch orders each layer's forward entries before its reverse entries, as built above
    return _to_tensors(entries)


def from_torch_cell(src) -> LSTMParams:
    """A ``torch.nn.LSTMCell`` (module or ``state_dict``) -> :class:`jaxlstm.LSTMParams`."""
    sd = _state_dict(src)
    unknown = sorted(set(sd) - {"weight_ih", "weight_hh", "bias_ih", "bias_hh"})
    if unknown:
        raise ValueError(
            f"from_torch_cell: unexpected keys {unknown}; a torch.nn.LSTMCell state_dict holds weight_ih, weight_hh, "
            "bias_ih and bias_hh. For a torch.nn.LSTM use from_torch_lstm."
        )
    return _torch_layer(sd, "", None, "from_torch_cell")


def to_torch_cell(params: LSTMParams, *, bias: bool = True) -> OrderedDict:
    """:class:`jaxlstm.LSTMParams` -> a ``state_dict`` for ``torch.nn.LSTMCell``."""
    return _to_tensors(_torch_entries(params, "", bias))


def torch_states_to_jax(h, c, num_layers: int, bidirectional: bool = False) -> tuple:
    """PyTorch ``(h_0, c_0)`` / ``(h_n, c_n)``, each ``(num_layers * D, B, H)``, -> per-layer jaxlstm states."""
    h, c = (np.asarray(t.detach().cpu().numpy()) if hasattr(t, "detach") else np.asarray(t) for t in (h, c))
    d = 2 if bidirectional else 1
    if h.shape[0] != num_layers * d or c.shape != h.shape:
        raise ValueError(
            f"expected h and c of shape ({num_layers * d}, B, H) for num_layers={num_layers}, "
            f"bidirectional={bidirectional}; received {h.shape} and {c.shape}."
        )
    out = []
    for k in range(num_layers):
        s = [LSTMState(jnp.asarray(c[k * d + j]), jnp.asarray(h[k * d + j])) for j in range(d)]
        out.append(BidirectionalState(*s) if bidirectional else s[0])
    return tuple(out)


def jax_states_to_torch(states) -> tuple:
    """Per-layer jaxlstm states -> PyTorch ``(h, c)`` tensors of shape ``(num_layers * D, B, H)``."""
    torch = _torch()
    hs, cs = [], []
    for s in states:
        for d in s if isinstance(s, BidirectionalState) else (s,):
            hs.append(np.asarray(d.hidden))
            cs.append(np.asarray(d.cell))
    return torch.from_numpy(np.stack(hs)), torch.from_numpy(np.stack(cs))


# ------------------------------------------------------------------ Keras 3


def from_keras(src, *, go_backwards_ok: bool = False) -> LSTMParams:
    """A ``keras.layers.LSTM`` (or its ``get_weights()`` list) -> :class:`jaxlstm.LSTMParams`.

    Expects Keras' defaults ``activation="tanh"``, ``recurrent_activation="sigmoid"``
    and ``go_backwards=False``. A layer with ``go_backwards=True`` reads time
    backwards: it is refused unless ``go_backwards_ok=True``, which says you
    will run the params with ``jaxlstm.lstm(..., reverse=True)`` (whose outputs
    come in time order, where Keras returns them in the order it read them). A
    ``Bidirectional`` converts whole with :func:`from_keras_bidirectional`.
    """
    return _from_keras(src, backwards_ok=go_backwards_ok)


def _from_keras(src, *, backwards_ok: bool) -> LSTMParams:
    if hasattr(src, "get_weights") and getattr(src, "built", True) is False:
        raise ValueError(
            "from_keras: this Keras LSTM is not built yet, so it has no weights: call it on an input (or "
            "layer.build((batch, time, features))) first."
        )
    if hasattr(src, "get_weights"):
        cfg = src.get_config() if hasattr(src, "get_config") else {}
        if cfg.get("activation", "tanh") != "tanh" or cfg.get("recurrent_activation", "sigmoid") != "sigmoid":
            raise ValueError("only Keras LSTMs with activation='tanh' and recurrent_activation='sigmoid' convert.")
        if cfg.get("go_backwards", False) and not backwards_ok:
            raise ValueError(
                "from_keras: this Keras LSTM has go_backwards=True: it reads time backwards, and params run "
                "forwards would not reproduce it. Pass go_backwards_ok=True and run them with "
                "jaxlstm.lstm(..., reverse=True) (outputs in time order; Keras returns them in reading order), "
                "or convert a Bidirectional layer whole with from_keras_bidirectional."
            )
        # read the variables' values directly (some Keras versions warn in get_weights under NumPy 2)
        src = [getattr(w, "value", w) for w in src.weights]
    weights = [np.asarray(w) for w in src]
    if len(weights) not in (2, 3):
        raise ValueError(f"expected [kernel, recurrent_kernel(, bias)]; received {len(weights)} arrays.")
    kernel, recurrent = weights[:2]
    bias = weights[2] if len(weights) == 3 else np.zeros((kernel.shape[1],), kernel.dtype)
    what = "from_keras"
    return _from_classic(
        _blocks(kernel, KERAS_ORDER, 1, f"{what} kernel"),
        _blocks(recurrent, KERAS_ORDER, 1, f"{what} recurrent_kernel"),
        _blocks(bias, KERAS_ORDER, 0, f"{what} bias"),
        what,
    )


def to_keras(params: LSTMParams, *, use_bias: bool = True) -> list:
    """:class:`jaxlstm.LSTMParams` -> ``[kernel, recurrent_kernel, bias]`` for ``layer.set_weights``."""
    wx, wh, b = _to_classic(params)
    out = [np.asarray(_join(wx, KERAS_ORDER, 1)), np.asarray(_join(wh, KERAS_ORDER, 1))]
    bias = np.asarray(_join(b, KERAS_ORDER, 0))
    if use_bias:
        out.append(bias)
    elif np.any(bias != 0):
        raise ValueError("use_bias=False was asked for but these params have non-zero biases.")
    return out


#: Keras ``Bidirectional(merge_mode=...)`` -> the ``merge`` of :func:`jaxlstm.bidirectional`.
KERAS_MERGE = {"concat": "concat", "sum": "sum", "mul": "mul", "ave": "mean", None: None}


def from_keras_bidirectional(src) -> BidirectionalParams:
    """A ``keras.layers.Bidirectional(keras.layers.LSTM(...))`` (or its weight list) ->
    :class:`jaxlstm.BidirectionalParams`.

    Run it with ``jaxlstm.bidirectional(params, xs, merge=KERAS_MERGE[layer.merge_mode])``;
    Keras' backward layer reads time reversed and its outputs are put back in
    time order, which is what jaxlstm's backward direction does.
    """
    if hasattr(src, "forward_layer") and hasattr(src, "backward_layer"):
        # Keras' backward layer has go_backwards=True, and Bidirectional puts its outputs back in time order
        return BidirectionalParams(from_keras(src.forward_layer), _from_keras(src.backward_layer, backwards_ok=True))
    if hasattr(src, "get_weights"):
        raise TypeError(
            f"from_keras_bidirectional expects a keras.layers.Bidirectional (or its weight list); received a "
            f"{type(src).__name__} layer. For a single keras.layers.LSTM use from_keras."
        )
    weights = list(src)
    if len(weights) not in (4, 6):
        raise ValueError(
            "from_keras_bidirectional: expected the forward then the backward LSTM's [kernel, recurrent_kernel"
            f"(, bias)], 4 or 6 arrays; received {len(weights)}."
        )
    half = len(weights) // 2
    return BidirectionalParams(from_keras(weights[:half]), from_keras(weights[half:]))


def to_keras_bidirectional(params: BidirectionalParams, *, use_bias: bool = True) -> list:
    """:class:`jaxlstm.BidirectionalParams` -> the weight list of ``keras.layers.Bidirectional(LSTM(H))``
    (``set_weights``)."""
    if not isinstance(params, BidirectionalParams):
        raise TypeError(f"to_keras_bidirectional expects jaxlstm.BidirectionalParams; received {_describe(params)}.")
    return to_keras(params.forward, use_bias=use_bias) + to_keras(params.backward, use_bias=use_bias)


# ------------------------------------------------------------------ Flax


def from_flax_linen(cell_params: Mapping) -> LSTMParams:
    """Parameters of ``flax.linen.LSTMCell`` or ``OptimizedLSTMCell`` -> :class:`jaxlstm.LSTMParams`.

    ``cell_params`` is the cell's own dict: ``{"ii": {"kernel"}, ..., "hi": {"kernel", "bias"}, ...}``
    (e.g. ``variables["params"]["cell"]`` for ``nn.RNN(cell)``).
    """
    p = cell_params.get("params", cell_params)
    what = "from_flax_linen"
    wx = {g: _get(p, (f"i{_FLAX_LETTER[g]}", "kernel"), what) for g in FLAX_ORDER}
    wh = {g: _get(p, (f"h{_FLAX_LETTER[g]}", "kernel"), what) for g in FLAX_ORDER}
    b = {g: _get(p, (f"h{_FLAX_LETTER[g]}", "bias"), what) for g in FLAX_ORDER}
    return _from_classic(wx, wh, b, what)


def to_flax_linen(params: LSTMParams) -> dict:
    """:class:`jaxlstm.LSTMParams` -> the parameter dict of ``flax.linen.LSTMCell`` / ``OptimizedLSTMCell``."""
    wx, wh, b = _to_classic(params)
    out = {}
    for g in FLAX_ORDER:
        out[f"i{_FLAX_LETTER[g]}"] = {"kernel": wx[g]}
        out[f"h{_FLAX_LETTER[g]}"] = {"kernel": wh[g], "bias": b[g]}
    return out


def _check_flax_activations(cell, what: str) -> None:
    """Only a cell with the LSTM's own activations converts exactly: sigmoid gates, tanh candidate and output."""
    gate = getattr(cell, "gate_fn", jax.nn.sigmoid)
    act = getattr(cell, "activation_fn", jax.nn.tanh)
    if gate is not jax.nn.sigmoid or act is not jax.nn.tanh:
        name = lambda f: getattr(f, "__name__", repr(f))  # noqa: E731
        raise ValueError(
            f"{what}: only cells with gate_fn=sigmoid and activation_fn=tanh convert exactly; this one has "
            f"gate_fn={name(gate)}, activation_fn={name(act)}. jaxlstm's cells use sigmoid and tanh."
        )


def _pure(src) -> dict:
    from flax import nnx

    if isinstance(src, nnx.Module):
        return nnx.to_pure_dict(nnx.state(src, nnx.Param))
    return src


def from_flax_nnx(src) -> LSTMParams:
    """``flax.nnx.LSTMCell`` or ``nnx.OptimizedLSTMCell`` (module, or its pure state dict) -> params.

    The two NNX cells store their weights differently: ``LSTMCell`` has eight
    ``Linear`` layers ``ii, if_, ig, io`` (no bias) and ``hi, hf, hg, ho``;
    ``OptimizedLSTMCell`` has two, ``dense_i`` ``(I, 4H)`` and ``dense_h``
    ``(H, 4H)`` with bias, blocks in the order i, f, g, o.
    """
    what = "from_flax_nnx"
    _check_flax_activations(src, what)
    p = _pure(src)
    if "dense_i" in p:
        return _from_classic(
            _blocks(_get(p, ("dense_i", "kernel"), what), FLAX_ORDER, 1, what),
            _blocks(_get(p, ("dense_h", "kernel"), what), FLAX_ORDER, 1, what),
            _blocks(_get(p, ("dense_h", "bias"), what), FLAX_ORDER, 0, what),
            what,
        )
    wx = {g: _get(p, (_NNX_INPUT[g], "kernel"), what) for g in FLAX_ORDER}
    wh = {g: _get(p, (f"h{_FLAX_LETTER[g]}", "kernel"), what) for g in FLAX_ORDER}
    b = {g: _get(p, (f"h{_FLAX_LETTER[g]}", "bias"), what) for g in FLAX_ORDER}
    return _from_classic(wx, wh, b, what)


def to_flax_nnx(params: LSTMParams, cell=None, *, optimized: bool = False) -> dict:
    """:class:`jaxlstm.LSTMParams` -> the pure state dict of ``nnx.LSTMCell`` (or ``OptimizedLSTMCell``).

    With ``cell`` given (an ``nnx.LSTMCell`` or ``nnx.OptimizedLSTMCell``), the
    weights are also written into it, and its kind decides the layout.
    """
    from flax import nnx

    if cell is not None:
        optimized = isinstance(cell, nnx.OptimizedLSTMCell)
    wx, wh, b = _to_classic(params)
    if optimized:
        pure = {
            "dense_i": {"kernel": _join(wx, FLAX_ORDER, 1)},
            "dense_h": {"kernel": _join(wh, FLAX_ORDER, 1), "bias": _join(b, FLAX_ORDER, 0)},
        }
    else:
        pure = {}
        for g in FLAX_ORDER:
            pure[_NNX_INPUT[g]] = {"kernel": wx[g]}
            pure[f"h{_FLAX_LETTER[g]}"] = {"kernel": wh[g], "bias": b[g]}
    if cell is not None:
        state = nnx.state(cell, nnx.Param)
        _check_same_shapes(nnx.to_pure_dict(state), pure, "to_flax_nnx")
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(cell, state)
    return pure


def _check_same_shapes(old: Any, new: Any, what: str) -> None:
    """Refuse to write weights of one size into a cell of another (nothing is broadcast)."""
    old_leaves = jax.tree_util.tree_leaves_with_path(old)
    new_leaves = dict(jax.tree_util.tree_leaves_with_path(new))
    for path, a in old_leaves:
        b = new_leaves.get(path)
        if b is not None and jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"{what}: the cell's {jax.tree_util.keystr(path)} has shape {jnp.shape(a)} but the params give "
                f"{jnp.shape(b)}; build the cell with the params' sizes (input_size, hidden_size) or leave cell=None."
            )


# ------------------------------------------------------------------ Equinox


def from_equinox(cell) -> LSTMParams:
    """``equinox.nn.LSTMCell`` -> :class:`jaxlstm.LSTMParams`."""
    order = EQUINOX_ORDER
    b = cell.bias if cell.bias is not None else jnp.zeros((cell.weight_ih.shape[0],), cell.weight_ih.dtype)
    what = "from_equinox"
    return _from_classic(
        _blocks(cell.weight_ih.T, order, 1, f"{what} weight_ih"),
        _blocks(cell.weight_hh.T, order, 1, f"{what} weight_hh"),
        _blocks(b, order, 0, f"{what} bias"),
        what,
    )


def to_equinox(params: LSTMParams, cell=None):
    """:class:`jaxlstm.LSTMParams` -> an ``equinox.nn.LSTMCell`` (a new one, or ``cell`` with its weights replaced)."""
    import equinox as eqx

    params = as_classic(params)
    if cell is None:
        cell = eqx.nn.LSTMCell(params.input_size, params.hidden_size, dtype=params.dtype, key=jax.random.key(0))
    wx, wh, b = _to_classic(params)
    order = EQUINOX_ORDER
    new = (_join(wx, order, 1).T, _join(wh, order, 1).T, _join(b, order, 0))
    for name, old, fresh in zip(("weight_ih", "weight_hh", "bias"), (cell.weight_ih, cell.weight_hh, cell.bias), new):
        if old is not None and old.shape != fresh.shape:
            raise ValueError(
                f"to_equinox: the cell's {name} has shape {old.shape} but the params give {fresh.shape}; build the "
                "cell with the params' input_size and hidden_size, or leave cell=None."
            )
    if cell.bias is None:
        if bool(jnp.any(new[2] != 0)):
            raise ValueError("this Equinox cell has use_bias=False but the params have non-zero biases.")
        return eqx.tree_at(lambda m: (m.weight_ih, m.weight_hh), cell, new[:2])
    return eqx.tree_at(lambda m: (m.weight_ih, m.weight_hh, m.bias), cell, new)


# ------------------------------------------------------------------ Haiku


def from_haiku(params: Mapping, name: str = "lstm") -> LSTMParams:
    """Parameters of ``haiku.LSTM`` -> :class:`jaxlstm.LSTMParams`.

    Haiku applies one ``Linear`` to ``[x, h]`` (input rows first) with gate
    blocks ``i, g, f, o``, and adds 1 to the forget pre-activation inside its
    forward pass; that 1 moves into ``b_f1`` here.

    Args:
      params: the transformed function's params, holding ``f"{name}/linear"``
        with ``w`` ``(I + H, 4H)`` and ``b`` ``(4H,)``; or that inner dict.
      name: the module's name (``"lstm"`` by default; ``"my_net/lstm"`` when nested).
    """
    what = "from_haiku"
    p = params.get(f"{name}/linear", params)
    w, b = jnp.asarray(_get(p, ("w",), what)), jnp.asarray(_get(p, ("b",), what))
    if w.ndim != 2 or w.shape[1] % 4 or w.shape[0] <= w.shape[1] // 4:
        raise ValueError(f"{what}: w has shape {w.shape}; expected (I + H, 4H) with I >= 1.")
    h = w.shape[1] // 4
    i = w.shape[0] - h
    bb = _blocks(b, HAIKU_ORDER, 0, f"{what} b")
    bb["f1"] = bb["f1"] + jnp.asarray(1, b.dtype)
    return _from_classic(_blocks(w[:i], HAIKU_ORDER, 1, what), _blocks(w[i:], HAIKU_ORDER, 1, what), bb, what)


def to_haiku(params: LSTMParams, name: str = "lstm") -> dict:
    """:class:`jaxlstm.LSTMParams` -> ``{f"{name}/linear": {"w", "b"}}`` for ``haiku.LSTM``.

    The forget bias is stored minus 1 (Haiku adds it back). Because of that
    shift, a round trip through Haiku is exact up to one rounding of ``b_f1 - 1``.
    """
    wx, wh, b = _to_classic(params)
    b = dict(b)
    b["f1"] = b["f1"] - jnp.asarray(1, b["f1"].dtype)
    w = jnp.concatenate([_join(wx, HAIKU_ORDER, 1), _join(wh, HAIKU_ORDER, 1)], axis=0)
    return {f"{name}/linear": {"w": w, "b": _join(b, HAIKU_ORDER, 0)}}
