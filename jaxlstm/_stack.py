"""Bidirectional layers and multi-layer stacks, built from :func:`jaxlstm.lstm`."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from ._layer import lstm
from ._params import LSTMParams, LSTMState, init_params

Array = jax.Array


class BidirectionalParams(NamedTuple):
    """Weights of a bidirectional layer: two independent :class:`LSTMParams`."""

    forward: LSTMParams
    backward: LSTMParams


class BidirectionalState(NamedTuple):
    """State of a bidirectional layer: one :class:`LSTMState` per direction.

    ``backward`` is the state after the backward pass has consumed the *first*
    time step, i.e. the summary of the whole sequence read right to left.
    """

    forward: LSTMState
    backward: LSTMState


Layer = Union[LSTMParams, BidirectionalParams]
LayerState = Union[LSTMState, BidirectionalState]

_MERGES: dict[str, Callable[[Array, Array], Array]] = {
    "concat": lambda f, b: jnp.concatenate([f, b], axis=-1),
    "sum": lambda f, b: f + b,
    "mean": lambda f, b: (f + b) / 2,
    "mul": lambda f, b: f * b,
}


def _merge_fn(merge) -> Callable[[Array, Array], Array]:
    if callable(merge):
        return merge
    if merge not in _MERGES:
        raise ValueError(
            f"merge must be one of {sorted(_MERGES)} or a function (forward, backward) -> merged; received {merge!r}."
        )
    return _MERGES[merge]


def bidirectional(
    params: BidirectionalParams,
    xs: Array,
    state: Optional[BidirectionalState] = None,
    *,
    seq_lengths: Optional[Array] = None,
    merge: Union[str, Callable[[Array, Array], Array]] = "concat",
    time_major: bool = False,
    unroll: int = 1,
    backward: str = "fused",
    checkpoint_every: Optional[int] = None,
) -> tuple[Array, BidirectionalState]:
    """A bidirectional LSTM layer: one pass forwards, one backwards, merged.

    The backward pass is ``lstm(params.backward, xs, reverse=True)``: with
    ``seq_lengths`` it reads each sequence's valid prefix from its last valid
    step to its first, so padding never reaches either direction.

    Args:
      params: :class:`BidirectionalParams`.
      xs: ``(B, T, I)``, ``(T, B, I)`` with ``time_major=True``, or ``(T, I)``.
      state: optional :class:`BidirectionalState` of initial states.
      seq_lengths: optional ``(B,)`` valid lengths (see :func:`jaxlstm.lstm`).
      merge: ``"concat"`` (default, ``[forward, backward]`` on the feature
        axis, ``2H`` features), ``"sum"``, ``"mean"``, ``"mul"`` (``H``
        features), or a function ``(forward, backward) -> merged``.
      time_major, unroll, backward, checkpoint_every: as in :func:`jaxlstm.lstm`.

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
            f"bidirectional expects jaxlstm.BidirectionalParams(forward, backward); received {type(params).__name__}."
        )
    merge_fn = _merge_fn(merge)
    fwd_state = bwd_state = None
    if state is not None:
        if not (isinstance(state, tuple) and len(state) == 2):
            raise TypeError(
                f"state of a bidirectional layer must be BidirectionalState(forward, backward); received {type(state).__name__}."
            )
        fwd_state, bwd_state = state
    kw = dict(
        seq_lengths=seq_lengths, time_major=time_major, unroll=unroll, backward=backward, checkpoint_every=checkpoint_every
    )
    ys_f, final_f = lstm(params.forward, xs, fwd_state, **kw)
    ys_b, final_b = lstm(params.backward, xs, bwd_state, reverse=True, **kw)
    return merge_fn(ys_f, ys_b), BidirectionalState(final_f, final_b)


def init_stack(
    key: Array,
    input_size: int,
    hidden_size: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    merge: str = "concat",
    **init_kwargs,
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
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int; received {num_layers!r}.")
    if bidirectional and (not isinstance(merge, str) or merge not in _MERGES):
        raise ValueError(
            f"init_stack needs a named merge to know the next layer's input size; one of {sorted(_MERGES)}, "
            f"received {merge!r}. For a custom merge, build the layers with jaxlstm.init_params."
        )
    layers = []
    size = input_size
    for k in jax.random.split(key, num_layers):
        if bidirectional:
            kf, kb = jax.random.split(k)
            layers.append(
                BidirectionalParams(
                    init_params(kf, size, hidden_size, **init_kwargs),
                    init_params(kb, size, hidden_size, **init_kwargs),
                )
            )
            size = 2 * hidden_size if merge == "concat" else hidden_size
        else:
            layers.append(init_params(k, size, hidden_size, **init_kwargs))
            size = hidden_size
    return tuple(layers)


def lstm_stack(
    layers: Sequence[Layer],
    xs: Array,
    states: Optional[Sequence[LayerState]] = None,
    *,
    seq_lengths: Optional[Array] = None,
    reverse: bool = False,
    merge: Union[str, Callable[[Array, Array], Array]] = "concat",
    time_major: bool = False,
    unroll: int = 1,
    backward: str = "fused",
    checkpoint_every: Optional[int] = None,
    dropout_rate: float = 0.0,
    dropout_key: Optional[Array] = None,
) -> tuple[Array, tuple[LayerState, ...]]:
    """Run a stack of LSTM layers, each feeding the next.

    Args:
      layers: a sequence of :class:`LSTMParams` (unidirectional) and/or
        :class:`BidirectionalParams` layers, e.g. from :func:`init_stack`.
      xs: ``(B, T, I)``, ``(T, B, I)`` with ``time_major=True``, or ``(T, I)``.
      states: optional initial state per layer (``LSTMState`` or
        ``BidirectionalState``), ``None`` for zeros.
      seq_lengths: optional ``(B,)`` valid lengths, applied in every layer.
      reverse: run the unidirectional layers backwards.
      merge: how bidirectional layers merge their directions (see
        :func:`bidirectional`).
      time_major, unroll, backward, checkpoint_every: as in :func:`jaxlstm.lstm`.
      dropout_rate: dropout applied to each layer's output except the last's
        (inverted dropout, so nothing changes at evaluation).
      dropout_key: PRNG key; dropout is applied only when it is given and
        ``dropout_rate > 0``.

    Returns:
      ``(outputs, final_states)``: the last layer's outputs and a tuple with
      each layer's final state. With ``seq_lengths``, outputs at padded steps
      are zero in every layer.

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
    if states is None:
        states = (None,) * len(layers)
    states = tuple(states)
    if len(states) != len(layers):
        raise ValueError(
            f"lstm_stack: received {len(states)} states for {len(layers)} layers; pass one state per layer "
            "(None for zeros) or states=None."
        )
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must lie in [0, 1); received {dropout_rate}.")
    use_dropout = dropout_rate > 0.0 and dropout_key is not None
    keys = jax.random.split(dropout_key, len(layers)) if use_dropout else [None] * len(layers)
    finals = []
    ys = xs
    for n, (layer, state, key) in enumerate(zip(layers, states, keys)):
        kw = dict(
            seq_lengths=seq_lengths,
            time_major=time_major,
            unroll=unroll,
            backward=backward,
            checkpoint_every=checkpoint_every,
        )
        if isinstance(layer, BidirectionalParams):
            ys, final = bidirectional(layer, ys, state, merge=merge, **kw)
        elif isinstance(layer, LSTMParams):
            ys, final = lstm(layer, ys, state, reverse=reverse, **kw)
        else:
            raise TypeError(
                f"lstm_stack: layer {n} is a {type(layer).__name__}; expected LSTMParams or BidirectionalParams."
            )
        if use_dropout and n < len(layers) - 1:
            keep = jax.random.bernoulli(key, 1.0 - dropout_rate, ys.shape)
            ys = jnp.where(keep, ys / jnp.asarray(1.0 - dropout_rate, ys.dtype), jnp.zeros_like(ys))
        finals.append(final)
    return ys, tuple(finals)
