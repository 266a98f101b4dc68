"""Input checks shared by the public functions.

Every check runs on static information (shapes, dtypes) so that it fires at
trace time, under ``jax.jit`` too, and says what was expected, what was
received, and the likely fix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def describe(value) -> str:
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


def check_floating(dtype, what: str) -> None:
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{what} must have a floating dtype; received {jnp.dtype(dtype)}. "
            "Cast with .astype(jnp.float32) (integer token ids need an embedding first)."
        )


def check_same_dtype(dtype, params_dtype, what: str) -> None:
    if jnp.dtype(dtype) != jnp.dtype(params_dtype):
        raise TypeError(
            f"{what} has dtype {jnp.dtype(dtype)} but the params have dtype {jnp.dtype(params_dtype)}; "
            f"jaxlstm does not promote silently. Cast one of them, e.g. {what}.astype({jnp.dtype(params_dtype).name!r}) "
            "or jax.tree.map(lambda w: w.astype(...), params)."
        )


def check_features(x, input_size: int, what: str = "x") -> None:
    if x.ndim < 1 or x.shape[-1] != input_size:
        got = x.shape[-1] if x.ndim else "a scalar"
        raise ValueError(
            f"{what} has {got} features (shape {x.shape}) but the params expect input_size = {input_size}. "
            f"Build the params with input_size={x.shape[-1] if x.ndim else '...'}, or check that the feature axis is last."
        )


def check_sequence(xs, input_size: int, time_major: bool) -> None:
    layout = "(T, B, I)" if time_major else "(B, T, I)"
    if xs.ndim not in (2, 3):
        raise ValueError(
            f"xs must have shape {layout} or, for one unbatched sequence, (T, I); received rank {xs.ndim} "
            f"with shape {xs.shape}. For more batch dimensions use jax.vmap or reshape them into B; "
            "for a single step use jaxlstm.lstm_step."
        )
    check_floating(xs.dtype, "xs")
    check_features(xs, input_size, "xs")


def check_state(state, batch_shape: tuple, hidden_size: int, dtype):
    from ._params import LSTMState

    if not (isinstance(state, tuple) and len(state) == 2):
        raise TypeError(
            f"state must be a jaxlstm.LSTMState(cell, hidden); received {describe(state)}. "
            "Use jaxlstm.zero_state(params, batch_shape) for a zero state."
        )
    state = LSTMState(*(jnp.asarray(s) for s in state))
    expected = tuple(batch_shape) + (hidden_size,)
    for name, s in zip(("cell", "hidden"), state):
        if s.shape != expected:
            raise ValueError(
                f"state.{name} has shape {s.shape}; expected {expected} (batch shape {tuple(batch_shape)}, "
                f"hidden_size {hidden_size}). Nothing is broadcast: build it with "
                f"jaxlstm.zero_state(params, batch_shape={tuple(batch_shape)}) or tile it to the batch."
            )
        check_same_dtype(s.dtype, dtype, f"state.{name}")
    return state


def check_seq_lengths(seq_lengths, batch_shape: tuple, num_steps: int):
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
        raise ValueError(
            f"seq_lengths must have shape {tuple(batch_shape)} ({hint}); received shape {arr.shape}."
        )
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


def check_mask(mask, expected_shape: tuple, dtype):
    mask = jnp.asarray(mask)
    if mask.shape != tuple(expected_shape):
        raise ValueError(
            f"recurrent_mask must have the state's shape {tuple(expected_shape)} (one mask per sequence, "
            f"shared by all time steps); received {mask.shape}."
        )
    check_same_dtype(mask.dtype, dtype, "recurrent_mask")
    return mask
