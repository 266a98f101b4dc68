"""Bidirectional layers and multi-layer stacks, built from :func:`jaxlstm.lstm`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ._checks import check_num_layers, check_rate, describe, resolve_bptt
from ._init import init_params
from ._layer import lstm
from ._types import (
    Array,
    BidirectionalParams,
    BidirectionalState,
    Bptt,
    Layer,
    LayerState,
    LSTMParams,
    LSTMState,
)

_MERGES: dict[str, Callable[[Array, Array], Array]] = {
    "concat": lambda f, b: jnp.concatenate([f, b], axis=-1),
    "sum": lambda f, b: f + b,
    "mean": lambda f, b: (f + b) / 2,
    "mul": lambda f, b: f * b,
}


def _apart(forward: Array, backward: Array) -> tuple[Array, Array]:
    return forward, backward


def merge_fn(merge: str | Callable[[Array, Array], Any] | None) -> Callable[[Array, Array], Any]:
    """The function a bidirectional layer merges its directions with (a name, a function, or ``None``: apart)."""
    if merge is None:
        return _apart
    if callable(merge):
        return merge
    if merge not in _MERGES:
        raise ValueError(
            f"merge must be one of {sorted(_MERGES)}, a function (forward, backward) -> merged, or None (the two "
            f"directions' outputs returned apart); received {merge!r}."
        )
    return _MERGES[merge]


def dropout_mask(key: Array, rate: float, shape: tuple, dtype: Any) -> Array:
    """Inverted-dropout multiplier: ``bernoulli(1 - rate) / (1 - rate)``."""
    keep = jax.random.bernoulli(key, 1.0 - rate, shape)
    return jnp.where(keep, jnp.asarray(1.0 / (1.0 - rate), dtype), jnp.asarray(0.0, dtype))


@contextlib.contextmanager
def _naming(prefix: str) -> Iterator[None]:
    """Prefix the message of a ``ValueError``/``TypeError`` raised inside, so it names the layer or direction."""
    try:
        yield
    except (ValueError, TypeError) as e:
        if type(e) not in (ValueError, TypeError):  # subclasses may not take a message alone
            raise
        raise type(e)(prefix + str(e)) from None


def _batch_shape(xs: Any, time_major: bool) -> tuple:
    shape = jnp.shape(xs)
    if len(shape) != 3:
        return ()
    return (shape[1],) if time_major else (shape[0],)


def bidirectional(
    params: BidirectionalParams,
    xs: Array,
    state: BidirectionalState | None = None,
    *,
    seq_lengths: Array | None = None,
    mask: Array | None = None,
    merge: str | Callable[[Array, Array], Any] | None = "concat",
    time_major: bool = False,
    unroll: int | bool = 1,
    bptt: Bptt | None = None,
    checkpoint_every: int | None = None,
    recurrent_masks: tuple[Array, Array] | None = None,
    backward: str | None = None,
    impl: str = "auto",
) -> tuple[Any, BidirectionalState]:
    """A bidirectional LSTM layer: one pass forwards, one backwards, merged.

    The backward pass is ``lstm(params.backward, xs, reverse=True)``: with
    ``seq_lengths`` or ``mask`` it reads each sequence's valid steps from the
    last to the first, so padding never reaches either direction.

    Args:
      params: :class:`BidirectionalParams`.
      xs: ``(B, T, I)``, ``(T, B, I)`` with ``time_major=True``, or ``(T, I)``.
      state: optional :class:`BidirectionalState` of initial states.
      seq_lengths: optional ``(B,)`` valid lengths (see :func:`jaxlstm.lstm`).
      mask: optional boolean ``(B, T)`` step mask (see :func:`jaxlstm.lstm`).
      merge: ``"concat"`` (default, ``[forward, backward]`` on the feature
        axis, ``2H`` features), ``"sum"``, ``"mean"``, ``"mul"`` (``H``
        features), a function ``(forward, backward) -> merged`` (which may
        return any pytree), or ``None``: the pair ``(forward_outputs,
        backward_outputs)``, each with ``H`` features.
      time_major, unroll, bptt, checkpoint_every: as in :func:`jaxlstm.lstm`.
      recurrent_masks: optional pair ``(forward_mask, backward_mask)``, each
        a ``recurrent_mask`` for :func:`jaxlstm.lstm`.
      impl: as in :func:`jaxlstm.lstm`, for each direction.

    Returns:
      ``(outputs, BidirectionalState(forward_final, backward_final))``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlstm
      >>> k1, k2 = jax.random.split(jax.random.key(0))
      >>> p = jaxlstm.BidirectionalParams(jaxlstm.init_params(k1, 3, 4), jaxlstm.init_params(k2, 3, 4))
      >>> ys, state = jaxlstm.bidirectional(p, jnp.ones((2, 6, 3)))
      >>> ys.shape, state.backward.hidden.shape
      ((2, 6, 8), (2, 4))
    """
    if not isinstance(params, BidirectionalParams):
        raise TypeError(
            f"bidirectional expects jaxlstm.BidirectionalParams(forward, backward); received {describe(params)}."
        )
    bptt = resolve_bptt(bptt, backward, "bidirectional")
    merge_fn_ = merge_fn(merge)
    for name, p in (("forward", params.forward), ("backward", params.backward)):
        if not isinstance(p, LSTMParams):
            raise TypeError(f"BidirectionalParams.{name} must be jaxlstm.LSTMParams; received {describe(p)}.")
    h_f, h_b = params.forward.output_size, params.backward.output_size
    if h_f != h_b and isinstance(merge, str) and merge != "concat":
        raise ValueError(
            f"merge={merge!r} adds or multiplies the two directions element by element, so both need one hidden "
            f"size; received forward hidden_size {h_f} and backward hidden_size {h_b}. Build both directions with "
            "the same hidden_size, or use merge='concat'."
        )
    fwd_state = bwd_state = None
    if state is not None:
        if not (isinstance(state, tuple) and len(state) == 2):
            raise TypeError(
                "state of a bidirectional layer must be BidirectionalState(forward, backward); "
                f"received {describe(state)}."
            )
        fwd_state, bwd_state = state
    kw: dict[str, Any] = dict(
        seq_lengths=seq_lengths,
        mask=mask,
        time_major=time_major,
        unroll=unroll,
        bptt=bptt,
        checkpoint_every=checkpoint_every,
        impl=impl,
    )
    mask_f, mask_b = (None, None) if recurrent_masks is None else recurrent_masks
    with _naming("bidirectional: forward direction: "):
        ys_f, final_f = lstm(params.forward, xs, fwd_state, recurrent_mask=mask_f, **kw)
    with _naming("bidirectional: backward direction: "):
        ys_b, final_b = lstm(params.backward, xs, bwd_state, reverse=True, recurrent_mask=mask_b, **kw)
    return merge_fn_(ys_f, ys_b), BidirectionalState(final_f, final_b)


def init_stack(
    key: Array,
    input_size: int,
    hidden_size: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    merge: str = "concat",
    **init_kwargs: Any,
) -> tuple[Layer, ...]:
    """Random parameters for a stack of (optionally bidirectional) LSTM layers.

    Layer ``k > 0`` takes the previous layer's output: ``H`` features, or
    ``2H`` for a bidirectional stack merged by ``"concat"``.

    Args:
      key: PRNG key.
      input_size, hidden_size: ``I`` and ``H``.
      num_layers: number of layers.
      bidirectional: build :class:`BidirectionalParams` layers.
      merge: the merge the stack will be run with (it sets the input size of
        layers after the first); a name, see :func:`bidirectional`.
      **init_kwargs: passed to :func:`jaxlstm.init_params` for every layer
        (``output_transform``, ``dtype``, initializers, ...).

    Returns:
      A tuple of ``num_layers`` layers for :func:`lstm_stack`.

    Example:
      >>> import jax, jaxlstm
      >>> layers = jaxlstm.init_stack(jax.random.key(0), 3, 4, num_layers=2, bidirectional=True)
      >>> layers[1].forward.input_size
      8
    """
    check_num_layers(num_layers)
    if bidirectional and (not isinstance(merge, str) or merge not in _MERGES):
        raise ValueError(
            f"init_stack needs a named merge to know the next layer's input size; one of {sorted(_MERGES)}, "
            f"received {merge!r}. For a custom merge, build the layers with jaxlstm.init_params."
        )
    layers: list[Layer] = []
    size = input_size
    out = init_kwargs.get("proj_size") or hidden_size  # the size of each layer's outputs
    for k in jax.random.split(key, num_layers):
        if bidirectional:
            kf, kb = jax.random.split(k)
            layers.append(
                BidirectionalParams(
                    init_params(kf, size, hidden_size, **init_kwargs),
                    init_params(kb, size, hidden_size, **init_kwargs),
                )
            )
            size = 2 * out if merge == "concat" else out
        else:
            layers.append(init_params(k, size, hidden_size, **init_kwargs))
            size = out
    return tuple(layers)


def lstm_stack(
    layers: Sequence[Layer],
    xs: Array,
    states: Sequence[LayerState] | None = None,
    *,
    seq_lengths: Array | None = None,
    mask: Array | None = None,
    reverse: bool = False,
    merge: str | Callable[[Array, Array], Any] | None = "concat",
    time_major: bool = False,
    unroll: int | bool = 1,
    bptt: Bptt | None = None,
    checkpoint_every: int | None = None,
    dropout_rate: float = 0.0,
    recurrent_dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
    backward: str | None = None,
    impl: str = "auto",
) -> tuple[Array, tuple[LayerState, ...]]:
    """Run a stack of LSTM layers, each feeding the next.

    Args:
      layers: a sequence of :class:`LSTMParams` (unidirectional) and/or
        :class:`BidirectionalParams` layers, e.g. from :func:`init_stack`.
      xs: ``(B, T, I)``, ``(T, B, I)`` with ``time_major=True``, or ``(T, I)``.
      states: optional initial state per layer (``LSTMState`` or
        ``BidirectionalState``), ``None`` for zeros; a one-layer stack also
        takes its state alone.
      seq_lengths: optional ``(B,)`` valid lengths, applied in every layer.
      mask: optional boolean ``(B, T)`` step mask, applied in every layer
        (see :func:`jaxlstm.lstm`).
      reverse: run the unidirectional layers backwards.
      merge: how bidirectional layers merge their directions (see
        :func:`bidirectional`). A merge that returns something other than
        one array (``None``: the two directions apart, or a function
        returning a pytree) is for the last layer only, since each other
        layer feeds the next one an array.
      time_major, unroll, bptt, checkpoint_every: as in :func:`jaxlstm.lstm`
        (``backward`` is the deprecated name of ``bptt``).
      dropout_rate: dropout applied to each layer's output except the last's
        (inverted dropout, so nothing changes at evaluation).
      recurrent_dropout_rate: variational recurrent dropout: one mask per
        sequence and direction on ``a^{t-1}`` where it enters the gates, the
        same at every time step (see ``recurrent_mask`` in :func:`jaxlstm.lstm`).
      dropout_key: PRNG key; dropout of either kind is applied only when it is
        given (training) and its rate is positive.
      impl: as in :func:`jaxlstm.lstm`, for every layer.

    Returns:
      ``(outputs, final_states)``: the last layer's outputs and a tuple with
      each layer's final state. With ``seq_lengths`` or ``mask``, outputs at
      padded or masked steps are zero in every layer.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlstm
      >>> layers = jaxlstm.init_stack(jax.random.key(0), 3, 4, num_layers=3)
      >>> ys, states = jaxlstm.lstm_stack(layers, jnp.ones((2, 5, 3)))
      >>> ys.shape, len(states)
      ((2, 5, 4), 3)
    """
    layers = tuple(layers)
    if not layers:
        raise ValueError("lstm_stack needs at least one layer; received an empty sequence.")
    if isinstance(states, (LSTMState, BidirectionalState)):
        if len(layers) != 1:
            raise ValueError(
                f"lstm_stack: received one state ({type(states).__name__}) for {len(layers)} layers; pass a "
                "sequence with one state per layer (None for zeros)."
            )
        states = (states,)
    initial: tuple = (None,) * len(layers) if states is None else tuple(states)
    if len(initial) != len(layers):
        raise ValueError(
            f"lstm_stack: received {len(initial)} states for {len(layers)} layers; pass one state per layer "
            "(None for zeros) or states=None."
        )
    bptt = resolve_bptt(bptt, backward, "lstm_stack")
    check_rate(dropout_rate, "dropout_rate")
    check_rate(recurrent_dropout_rate, "recurrent_dropout_rate")
    use_dropout = dropout_rate > 0.0 and dropout_key is not None
    use_recurrent = recurrent_dropout_rate > 0.0 and dropout_key is not None
    keys: Any = jax.random.split(dropout_key, len(layers)) if dropout_key is not None else [None] * len(layers)
    batch = _batch_shape(xs, time_major)
    finals = []
    ys = xs
    kw: dict[str, Any] = dict(
        seq_lengths=seq_lengths,
        mask=mask,
        time_major=time_major,
        unroll=unroll,
        bptt=bptt,
        checkpoint_every=checkpoint_every,
        impl=impl,
    )
    for n, (layer, state, key) in enumerate(zip(layers, initial, keys)):
        if not isinstance(layer, (BidirectionalParams, LSTMParams)):
            raise TypeError(f"lstm_stack: layer {n} is {describe(layer)}; expected LSTMParams or BidirectionalParams.")
        k_out, k_fwd, k_bwd = jax.random.split(key, 3) if key is not None else (None, None, None)
        lead = jnp.shape(ys)[:-1]
        with _naming(f"lstm_stack: layer {n}: "):
            ys, final = _stack_layer(
                layer, ys, state, k_fwd, k_bwd, batch, merge, reverse, use_recurrent, recurrent_dropout_rate, kw
            )
        if n < len(layers) - 1 and not isinstance(ys, jax.Array):
            raise ValueError(
                f"lstm_stack: layer {n}: merge={merge!r} gave {describe(ys)}, but layer {n + 1} needs one array "
                "as its input. Merge the directions into one array (e.g. merge='concat') when a layer follows, "
                "or run the last bidirectional layer with jaxlstm.bidirectional to get its directions apart."
            )
        if n < len(layers) - 1 and not _same_lead(ys.shape[:-1], lead):
            raise ValueError(
                f"lstm_stack: layer {n}: the merge gave an array of shape {ys.shape}, but layer {n + 1} needs one "
                f"row of features per step, {_shape_text(lead)}: keep the batch and time axes (merge along the "
                "last axis), or run the reducing merge on the last layer only."
            )
        if use_dropout and k_out is not None and n < len(layers) - 1:
            ys = ys * dropout_mask(k_out, dropout_rate, ys.shape, ys.dtype)
        finals.append(final)
    return ys, tuple(finals)


def _same_lead(a: tuple, b: tuple) -> bool:
    """Equal leading axes; a size that is not an int (symbolic, in an export) is compared only by position."""
    return len(a) == len(b) and all(x == y for x, y in zip(a, b) if isinstance(x, int) and isinstance(y, int))


def _shape_text(lead: tuple) -> str:
    return "(" + ", ".join(str(d) for d in lead) + ", F)"


def _stack_layer(
    layer: Layer,
    ys: Array,
    state: Any,
    k_fwd: Array | None,
    k_bwd: Array | None,
    batch: tuple,
    merge: Any,
    reverse: bool,
    use_recurrent: bool,
    recurrent_dropout_rate: float,
    kw: dict,
) -> tuple[Array, LayerState]:
    """One layer of :func:`lstm_stack`, with its recurrent dropout masks."""
    if isinstance(layer, BidirectionalParams):
        masks = None
        if use_recurrent and k_fwd is not None and k_bwd is not None:
            f, b = layer.forward, layer.backward
            masks = (
                dropout_mask(k_fwd, recurrent_dropout_rate, batch + (f.output_size,), f.dtype),
                dropout_mask(k_bwd, recurrent_dropout_rate, batch + (b.output_size,), b.dtype),
            )
        return bidirectional(layer, ys, state, merge=merge, recurrent_masks=masks, **kw)
    mask = None
    if use_recurrent and k_fwd is not None:
        mask = dropout_mask(k_fwd, recurrent_dropout_rate, batch + (layer.output_size,), layer.dtype)
    return lstm(layer, ys, state, reverse=reverse, recurrent_mask=mask, **kw)
