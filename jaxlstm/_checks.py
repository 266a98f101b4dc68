"""Every argument check of the package, and its message.

Each check runs on static information (shapes, dtypes, Python values) so
that it fires at trace time, under ``jax.jit`` too, and says what was
expected, what was received, and the likely fix. Messages shared by several
entry points live here once.
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from ._types import Array, Bptt, LSTMParams, LSTMState

#: The ``bptt`` options (see :func:`jaxlstm.lstm`).
BPTT_OPTIONS = ("custom", "autodiff")
_OLD_BACKWARD = {"fused": "custom", "autodiff": "autodiff"}


def describe(value: Any) -> str:
    """A short description of ``value`` for an error message: never an array's repr or a bare class name."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"an array of shape {tuple(shape)} and dtype {jnp.dtype(dtype).name}"
    if value is None:
        return "None"
    if isinstance(value, (bool, int, float, str)):
        return f"{value!r} ({type(value).__name__})"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    cls = type(value)
    return f"a {cls.__qualname__}" if cls.__module__ == "builtins" else f"a {cls.__module__}.{cls.__qualname__}"


def check_floating(dtype: Any, what: str) -> None:
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{what} must have a floating dtype; received {jnp.dtype(dtype)}. "
            "Cast with .astype(jnp.float32) (integer token ids need an embedding first)."
        )


def check_same_dtype(dtype: Any, params_dtype: Any, what: str) -> None:
    if jnp.dtype(dtype) != jnp.dtype(params_dtype):
        raise TypeError(
            f"{what} has dtype {jnp.dtype(dtype)} but the params have dtype {jnp.dtype(params_dtype)}; "
            "jaxlstm does not promote silently. Cast one of them, e.g. "
            f"{what}.astype({jnp.dtype(params_dtype).name!r}) "
            "or jax.tree.map(lambda w: w.astype(...), params)."
        )


def check_features(x: Array, input_size: int, what: str = "x") -> None:
    if x.ndim < 1 or x.shape[-1] != input_size:
        got = x.shape[-1] if x.ndim else "a scalar"
        raise ValueError(
            f"{what} has {got} features (shape {x.shape}) but the params expect input_size = {input_size}. "
            f"Build the params with input_size={x.shape[-1] if x.ndim else '...'}, "
            "or check that the feature axis is last."
        )


def check_sequence(xs: Array, input_size: int, time_major: bool) -> None:
    layout = "(T, B, I)" if time_major else "(B, T, I)"
    if xs.ndim not in (2, 3):
        raise ValueError(
            f"xs must have shape {layout} or, for one unbatched sequence, (T, I); received rank {xs.ndim} "
            f"with shape {xs.shape}. For more batch dimensions use jax.vmap or reshape them into B; "
            "for a single step use jaxlstm.lstm_step."
        )
    check_floating(xs.dtype, "xs")
    check_features(xs, input_size, "xs")


def check_state(
    state: Any,
    batch_shape: tuple,
    hidden_size: int,
    dtype: Any,
    params_dtype: Any = None,
    output_size: int | None = None,
) -> LSTMState:
    if not (isinstance(state, tuple) and len(state) == 2):
        raise TypeError(
            f"state must be a jaxlstm.LSTMState(cell, hidden); received {describe(state)}. "
            "Use jaxlstm.zero_state(params, batch_shape) for a zero state."
        )
    state = LSTMState(*(jnp.asarray(s) for s in state))
    sizes = {"cell": hidden_size, "hidden": hidden_size if output_size is None else output_size}
    for name, s in zip(("cell", "hidden"), state):
        expected = tuple(batch_shape) + (sizes[name],)
        if s.shape != expected:
            what = "proj_size" if name == "hidden" and sizes["hidden"] != hidden_size else "hidden_size"
            raise ValueError(
                f"state.{name} has shape {s.shape}; expected {expected} (batch shape {tuple(batch_shape)}, "
                f"{what} {sizes[name]}). Nothing is broadcast: build it with "
                f"jaxlstm.zero_state(params, batch_shape={tuple(batch_shape)}) or tile it to the batch."
            )
        if params_dtype is not None and jnp.dtype(dtype) != jnp.dtype(params_dtype):
            if s.dtype != jnp.dtype(dtype):
                raise TypeError(
                    f"state.{name} has dtype {s.dtype}; a layer with {jnp.dtype(params_dtype).name} params keeps "
                    f"its state in {jnp.dtype(dtype).name} (the cell state and every sum stay in float32 under half "
                    f"precision). Build it with jaxlstm.zero_state(params, batch_shape) or cast it with "
                    f".astype(jnp.{jnp.dtype(dtype).name})."
                )
        else:
            check_same_dtype(s.dtype, dtype, f"state.{name}")
    return state


def check_seq_lengths(seq_lengths: Any, batch_shape: tuple, num_steps: int) -> Array:
    """Validate ``seq_lengths``; returns it as an int32 array."""
    arr = seq_lengths
    if not isinstance(arr, jax.Array):
        arr = np.asarray(arr)
    if arr.shape != tuple(batch_shape):
        hint = (
            "one length per sequence of the batch"
            if batch_shape
            else "a scalar, since xs is one unbatched sequence (T, I)"
        )
        raise ValueError(f"seq_lengths must have shape {tuple(batch_shape)} ({hint}); received shape {arr.shape}.")
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(
            f"seq_lengths must have an integer dtype; received {arr.dtype}. "
            "Pass the number of valid steps of each sequence, e.g. jnp.asarray(lengths, jnp.int32)."
        )
    if not isinstance(arr, jax.core.Tracer):
        concrete = np.asarray(arr)
        if concrete.size and (concrete.min() < 0 or concrete.max() > num_steps):
            raise ValueError(
                f"seq_lengths must lie in [0, T] = [0, {num_steps}]; received values from {concrete.min()} "
                f"to {concrete.max()}. Lengths count valid time steps of xs; pad xs to the longest sequence."
            )
    return jnp.asarray(arr, jnp.int32)


def check_step_mask(
    mask: Any, batch_shape: tuple, num_steps: int, time_major: bool, lengths: Array | None = None
) -> Array:
    """Validate a step mask; returns it time-major ``(T, *B)``, boolean.

    A concrete mask is also checked against concrete ``lengths``: it may not
    mark a step at or past its sequence's length as valid.
    """
    arr = mask if isinstance(mask, jax.Array) else np.asarray(mask)
    batch_shape = tuple(batch_shape)
    if not batch_shape:
        expected, layout = (num_steps,), "(T,) for one unbatched sequence"
    elif time_major:
        expected, layout = (num_steps,) + batch_shape, "(T, B) since time_major=True"
    else:
        expected, layout = batch_shape + (num_steps,), "(B, T), one row per sequence"
    if arr.shape != expected:
        raise ValueError(
            f"mask must have shape {expected} ({layout}); received shape {arr.shape}. "
            "It marks the valid steps of xs and is never broadcast."
        )
    if arr.dtype != np.bool_:
        raise TypeError(
            f"mask must be boolean (True at the steps that count); received dtype {arr.dtype}. "
            "Convert it explicitly, e.g. mask != 0 or mask.astype(bool)."
        )
    arr = jnp.asarray(arr)
    if batch_shape and not time_major:
        arr = arr.T
    if lengths is not None and not isinstance(arr, jax.core.Tracer) and not isinstance(lengths, jax.core.Tracer):
        steps = np.arange(num_steps).reshape((num_steps,) + (1,) * len(batch_shape))
        beyond = np.asarray(arr) & (steps >= np.asarray(lengths)[None])
        if beyond.any():
            where = np.argwhere(beyond)[0]
            seq = f"sequence {where[1]}" if batch_shape else "the sequence"
            length = np.asarray(lengths)[tuple(where[1:])]
            raise ValueError(
                f"mask and seq_lengths disagree: mask marks step {where[0]} of {seq} valid but its seq_length is "
                f"{length}. Give one of them, or make the mask false at every step t >= seq_lengths."
            )
    return arr


def check_mask(mask: Any, expected_shape: tuple, dtype: Any) -> Array:
    mask = jnp.asarray(mask)
    if mask.shape != tuple(expected_shape):
        raise ValueError(
            f"recurrent_mask must have the state's shape {tuple(expected_shape)} (one mask per sequence, "
            f"shared by all time steps); received {mask.shape}."
        )
    check_same_dtype(mask.dtype, dtype, "recurrent_mask")
    return mask


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int, if it is a positive integer (bools refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int; received {value!r} of type {type(value).__name__}.")
    if value <= 0:
        raise ValueError(
            f"{name} must be a positive int; received {value}. "
            f"An LSTM layer needs at least one {name.replace('_size', '')} feature."
        )
    return int(value)


def check_params(params: Any) -> LSTMParams:
    """Validate the internal consistency of an :class:`LSTMParams` (static shapes only)."""
    if not isinstance(params, LSTMParams):
        raise TypeError(
            f"expected jaxlstm.LSTMParams; received {describe(params)}. "
            "Build one with jaxlstm.init_params or jaxlstm.params_from_gates."
        )
    w_h, w_x, b, w_hr = params.w_h, params.w_x, params.b, params.w_hr
    if w_hr is None and (getattr(w_h, "ndim", None) != 2 or w_h.shape[1] != 4 * w_h.shape[0]):
        raise ValueError(
            f"LSTMParams.w_h must have shape (H, 4H) (or (P, 4H) with a projection w_hr); received {describe(w_h)}."
        )
    if w_hr is not None:
        if getattr(w_h, "ndim", None) != 2 or w_h.shape[1] % 4:
            raise ValueError(f"LSTMParams.w_h must have shape (P, 4H); received {describe(w_h)}.")
        h, p = w_h.shape[1] // 4, w_h.shape[0]
        if getattr(w_hr, "shape", None) != (h, p):
            raise ValueError(
                f"LSTMParams.w_hr (the projection) must have shape (H, P) = ({h}, {p}) to match w_h {w_h.shape}; "
                f"received {describe(w_hr)}."
            )
    h = w_h.shape[1] // 4
    if getattr(w_x, "ndim", None) != 2 or w_x.shape[1] != 4 * h:
        raise ValueError(
            f"LSTMParams.w_x must have shape (I, {4 * h}) to match w_h {w_h.shape}; received {describe(w_x)}."
        )
    if getattr(b, "shape", None) != (4 * h,):
        raise ValueError(f"LSTMParams.b must have shape ({4 * h},); received {describe(b)}.")
    if (params.w_o is None) != (params.b_o is None):
        raise ValueError(
            "LSTMParams: w_o and b_o must both be set (the cell with an output map) or both be None (classic cell)."
        )
    w_o, b_o = params.w_o, params.b_o
    if w_o is not None and b_o is not None and (w_o.shape != (h, h) or b_o.shape != (h,)):
        raise ValueError(f"LSTMParams: w_o must be ({h}, {h}) and b_o ({h},); received {w_o.shape} and {b_o.shape}.")
    dtypes = {a.dtype for a in params if a is not None}
    if len(dtypes) != 1:
        raise TypeError(
            f"LSTMParams: all weights must share one dtype; received {sorted(map(str, dtypes))}. "
            "Cast them with jax.tree.map(lambda a: a.astype(jnp.float32), params)."
        )
    check_floating(w_h.dtype, "LSTMParams weights")
    return params


def check_unroll(unroll: Any) -> None:
    if isinstance(unroll, bool):
        return
    if not isinstance(unroll, int) or unroll < 1:
        raise ValueError(f"unroll must be a positive int or a bool; received {unroll!r}.")


def check_bptt(bptt: Any, checkpoint_every: Any) -> None:
    if bptt not in BPTT_OPTIONS:
        raise ValueError(
            f"bptt must be one of {BPTT_OPTIONS}; received {bptt!r}. Use 'autodiff' for forward-mode "
            "differentiation (jax.jvp, jax.hessian), 'custom' (the hand-written backward pass) otherwise."
        )
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1
    ):
        raise ValueError(
            "checkpoint_every must be None or a positive int (steps per recomputed chunk); "
            f"received {checkpoint_every!r}."
        )


def resolve_bptt(bptt: str | None, backward: str | None, where: str = "lstm") -> Bptt:
    """The ``bptt`` option, accepting the deprecated ``backward=`` keyword (for one release)."""
    if backward is None:
        return cast(Bptt, "custom" if bptt is None else bptt)  # an unknown name is refused by check_bptt
    if bptt is not None:
        raise TypeError(f"{where}: give bptt= only (backward= is its deprecated old name).")
    if backward not in _OLD_BACKWARD:
        raise ValueError(f"{where}: backward must be 'fused' or 'autodiff'; received {backward!r}. It is now bptt=.")
    new = cast(Bptt, _OLD_BACKWARD[backward])
    warnings.warn(
        f"{where}: backward={backward!r} is deprecated and will be removed in jaxlstm 0.2.0; use bptt={new!r} "
        "(the old name read like the backward direction of a bidirectional layer).",
        DeprecationWarning,
        stacklevel=3,
    )
    return new


def check_num_layers(num_layers: Any) -> int:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int; received {num_layers!r}.")
    return num_layers


def check_rate(rate: Any, name: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must lie in [0, 1); received {rate!r}.")
    return float(rate)


def sequence_shape(xs: Array, time_major: bool) -> tuple[int, tuple]:
    """``(T, batch_shape)`` of a checked sequence."""
    if xs.ndim == 2:
        return xs.shape[0], ()
    if time_major:
        return xs.shape[0], (xs.shape[1],)
    return xs.shape[1], (xs.shape[0],)
