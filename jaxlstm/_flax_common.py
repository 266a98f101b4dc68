"""What the linen and NNX modules share: dtype policy, layer sizes, the call into the core."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ._cell import step
from ._checks import check_floating, check_num_layers, describe, positive_int
from ._precision import state_dtype
from ._stack import lstm_stack, merge_fn
from ._types import Array, BidirectionalState, LSTMParams, LSTMState


def merged_size(merge: Any, hidden_size: int) -> int:
    """Features after merging the two directions of a bidirectional layer that another layer follows."""
    lead = (2, 3)  # a batch and a time axis of distinct sizes: a merge that drops either is seen
    spec = jax.ShapeDtypeStruct(lead + (hidden_size,), jnp.float32)
    merged = jax.eval_shape(merge_fn(merge), spec, spec)
    if not isinstance(merged, jax.ShapeDtypeStruct):
        raise ValueError(
            f"merge={merge!r} gives {describe(merged)} rather than one array, so no layer can follow it: use it "
            "with num_layers=1, or merge into one array (e.g. merge='concat')."
        )
    if merged.shape[:-1] != lead:
        raise ValueError(
            f"merge={merge!r} gives an array of shape {merged.shape} for two directions of shape {spec.shape}, "
            "but the next layer needs one row of features per step (B, T, F): keep the batch and time axes "
            "(merge along the last axis), or use such a merge with num_layers=1."
        )
    return int(merged.shape[-1])


def layer_input_sizes(
    input_size: int, hidden_size: int, num_layers: int, bidirectional: bool, merge: Any, proj_size: int | None = None
) -> list[int]:
    """The input size of each layer of a stack (layers after the first read ``P`` features with a projection)."""
    check_num_layers(num_layers)
    positive_int(hidden_size, "hidden_size")
    if proj_size is not None:
        positive_int(proj_size, "proj_size")
    if num_layers == 1:
        return [input_size]
    size = proj_size or hidden_size
    out = size if not bidirectional else merged_size(merge, size)
    return [input_size] + [out] * (num_layers - 1)


def compute_dtype(xs: Any, dtype: Any, param_dtype: Any) -> Any:
    """The dtype the core runs in: ``dtype`` if given, else the promotion of the input's and the params'."""
    check_floating(jnp.result_type(xs), "xs")
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.promote_types(jnp.result_type(xs), param_dtype)


def cast_tree(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda a: jnp.asarray(a).astype(dtype), tree)


def cell_step(params: LSTMParams, carry: Any, x: Any, dtype: Any, param_dtype: Any) -> tuple[Any, Array]:
    """One step of a module cell: params, carry and input cast to the compute dtype, then the fused step.

    The carry comes back with the structure and dtypes it came in with (an
    :class:`jaxlstm.LSTMState` or a plain ``(c, h)`` tuple, in ``param_dtype``
    from ``initialize_carry``), so ``nn.RNN``/``nnx.RNN`` can scan it whatever
    the compute dtype; the output ``y`` is in the compute dtype.
    """
    if not (isinstance(carry, tuple) and len(carry) == 2):
        raise TypeError(
            f"the carry of an LSTM cell is a pair (cell, hidden), e.g. from initialize_carry; "
            f"received {describe(carry)}."
        )
    x = jnp.asarray(x)
    cdt = compute_dtype(x, dtype, param_dtype)
    params = cast_tree(params, cdt)
    cell, hidden = (jnp.asarray(c) for c in carry)
    sdt = state_dtype(cdt)
    new, y = step(params, LSTMState(cell.astype(sdt), hidden.astype(sdt)), x.astype(cdt))
    out = (new.cell.astype(cell.dtype), new.hidden.astype(hidden.dtype))
    if hasattr(carry, "_fields"):  # LSTMState or another named pair: rebuilt as such
        return type(carry)._make(out), y  # type: ignore[attr-defined]
    return out, y


def zero_carry(batch_shape: tuple, hidden_size: int, proj_size: int | None, dtype: Any) -> LSTMState:
    """Zeros: the cell ``(*batch, H)``, the hidden state ``(*batch, P)`` (``P = H`` without a projection)."""
    batch = tuple(batch_shape)
    return LSTMState(jnp.zeros(batch + (hidden_size,), dtype), jnp.zeros(batch + (proj_size or hidden_size,), dtype))


def module_zero_states(module: Any, input_shape: tuple[int, ...]) -> tuple:
    """``initialize_carry`` of a linen or NNX ``LSTM``: zero states from the module's own settings."""
    return zero_states(
        input_shape,
        module.hidden_size,
        module.num_layers,
        module.bidirectional,
        module.time_major,
        module.param_dtype,
        module.proj_size,
    )


def zero_states(
    input_shape: tuple[int, ...],
    hidden_size: int,
    num_layers: int,
    bidirectional: bool,
    time_major: bool,
    dtype: Any,
    proj_size: int | None = None,
) -> tuple:
    """Zero initial states of a module stack, one per layer, for inputs of ``input_shape``."""
    shape = tuple(input_shape)
    if len(shape) not in (2, 3):
        layout = "(T, B, I)" if time_major else "(B, T, I)"
        raise ValueError(f"initialize_carry: input_shape must be {layout} or (T, I); received {shape}.")
    batch = () if len(shape) == 2 else ((shape[1],) if time_major else (shape[0],))
    one = zero_carry(batch, hidden_size, proj_size, dtype)
    return tuple(BidirectionalState(one, one) if bidirectional else one for _ in range(num_layers))


def run(
    layers: Any,
    xs: Any,
    initial_state: Any,
    *,
    dtype: Any,
    param_dtype: Any,
    seq_lengths: Any,
    merge: Any,
    mask: Any = None,
    reverse: bool,
    time_major: bool,
    unroll: Any,
    bptt: str | None,
    checkpoint_every: int | None,
    dropout_rate: float,
    recurrent_dropout_rate: float,
    dropout_key: Any | None,
    backward: str | None = None,
    impl: str = "auto",
) -> tuple[Array, tuple]:
    """Cast to the compute dtype and run :func:`jaxlstm.lstm_stack`."""
    xs = jnp.asarray(xs)
    cdt = compute_dtype(xs, dtype, param_dtype)
    layers = cast_tree(layers, cdt)
    if isinstance(initial_state, (LSTMState, BidirectionalState)):  # a one-layer stack's state alone
        initial_state = (initial_state,)
    if initial_state is not None:  # lstm_stack checks there is one per layer
        sdt = state_dtype(cdt)
        initial_state = tuple(None if s is None else cast_tree(s, sdt) for s in initial_state)
    return lstm_stack(
        layers,
        xs.astype(cdt),
        initial_state,
        seq_lengths=seq_lengths,
        mask=mask,
        reverse=reverse,
        merge=merge,
        time_major=time_major,
        unroll=unroll,
        bptt=bptt,  # type: ignore[arg-type]
        checkpoint_every=checkpoint_every,
        dropout_rate=dropout_rate,
        recurrent_dropout_rate=recurrent_dropout_rate,
        dropout_key=dropout_key,
        backward=backward,
        impl=impl,
    )


def needs_dropout_key(
    deterministic: bool | None, dropout_rate: float, recurrent_dropout_rate: float, num_layers: int
) -> bool:
    return not deterministic and (recurrent_dropout_rate > 0.0 or (dropout_rate > 0.0 and num_layers > 1))


def final_summary(states: Any, bidirectional: bool) -> Array:
    """The last layer's final hidden state (both directions concatenated if bidirectional)."""
    last = states[-1]
    if bidirectional:
        return jnp.concatenate([last.forward.hidden, last.backward.hidden], axis=-1)
    return last.hidden


def initial_state_shape(num_layers: int, bidirectional: bool, hidden_size: int) -> tuple[int, int, int]:
    """Shape of a learned initial cell (or hidden) state: ``(num_layers, directions, H)``."""
    return (num_layers, 2 if bidirectional else 1, hidden_size)


def learned_states(cell: Array, hidden: Array, xs: Array, time_major: bool, bidirectional: bool) -> tuple:
    """Per-layer initial states from learned ``(num_layers, directions, H)`` arrays, broadcast over the batch."""
    batch = () if xs.ndim == 2 else ((xs.shape[1],) if time_major else (xs.shape[0],))

    def one(k: int, d: int) -> LSTMState:
        return LSTMState(
            jnp.broadcast_to(cell[k, d], batch + (cell.shape[-1],)),
            jnp.broadcast_to(hidden[k, d], batch + (hidden.shape[-1],)),
        )

    if bidirectional:
        return tuple(BidirectionalState(one(k, 0), one(k, 1)) for k in range(cell.shape[0]))
    return tuple(one(k, 0) for k in range(cell.shape[0]))
