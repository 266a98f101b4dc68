"""One LSTM layer over a whole sequence: ``jax.lax.scan`` of the cell step."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from . import _errors
from ._cell import _step
from ._params import LSTMParams, LSTMState, check_params, zero_state

Array = jax.Array


def _check_unroll(unroll) -> None:
    if isinstance(unroll, bool):
        return
    if not isinstance(unroll, int) or unroll < 1:
        raise ValueError(f"unroll must be a positive int or a bool; received {unroll!r}.")


def _sequence_shape(xs, time_major: bool) -> tuple[int, tuple]:
    """``(T, batch_shape)`` of a checked sequence."""
    if xs.ndim == 2:
        return xs.shape[0], ()
    if time_major:
        return xs.shape[0], (xs.shape[1],)
    return xs.shape[1], (xs.shape[0],)


def prepare(params, xs, state, seq_lengths, time_major: bool, unroll, what: str = "lstm"):
    """Check every argument of a layer call at trace time; returns them normalised."""
    check_params(params)
    xs = jnp.asarray(xs)
    _errors.check_sequence(xs, params.input_size, time_major)
    _errors.check_same_dtype(xs.dtype, params.dtype, "xs")
    _check_unroll(unroll)
    num_steps, batch = _sequence_shape(xs, time_major)
    if state is None:
        state = zero_state(params, batch)
    else:
        state = _errors.check_state(state, batch, params.hidden_size, params.dtype)
    lengths = None
    if seq_lengths is not None:
        lengths = _errors.check_seq_lengths(seq_lengths, batch, num_steps)
    return xs, state, lengths


def _scan_time_major(params: LSTMParams, xs: Array, state: LSTMState, lengths, reverse: bool, unroll):
    """Scan over axis 0 of ``xs`` ``(T, *B, I)``; masked when ``lengths`` is given."""
    if lengths is None:
        final, hs = jax.lax.scan(lambda s, x: _step(params, s, x), state, xs, reverse=reverse, unroll=unroll)
        return hs, final

    # Steps t >= L keep the state and emit zeros. Scanning backwards with the same
    # mask processes each valid prefix from its last valid step to its first.
    def body(s, inputs):
        x, t = inputs
        new, h = _step(params, s, x)
        valid = (t < lengths)[..., None]
        new = LSTMState(jnp.where(valid, new.cell, s.cell), jnp.where(valid, new.hidden, s.hidden))
        return new, jnp.where(valid, h, jnp.zeros_like(h))

    steps = jnp.arange(xs.shape[0], dtype=jnp.int32)
    final, hs = jax.lax.scan(body, state, (xs, steps), reverse=reverse, unroll=unroll)
    return hs, final


@functools.partial(jax.jit, static_argnames=("reverse", "time_major", "unroll"))
def _lstm_jit(params, xs, state, lengths, *, reverse, time_major, unroll):
    batched_batch_major = xs.ndim == 3 and not time_major
    if batched_batch_major:
        xs = jnp.swapaxes(xs, 0, 1)
    hs, final = _scan_time_major(params, xs, state, lengths, reverse, unroll)
    if batched_batch_major:
        hs = jnp.swapaxes(hs, 0, 1)
    return hs, final


def lstm(
    params: LSTMParams,
    xs: Array,
    state: Optional[LSTMState] = None,
    *,
    seq_lengths: Optional[Array] = None,
    reverse: bool = False,
    time_major: bool = False,
    unroll: int = 1,
) -> tuple[Array, LSTMState]:
    """Run one LSTM layer over a sequence (``jax.lax.scan``, jit-compiled).

    Args:
      params: :class:`LSTMParams` (seed or classic cell).
      xs: ``(B, T, I)``; ``(T, B, I)`` with ``time_major=True``; or one
        unbatched sequence ``(T, I)``. Must have the params' dtype.
      state: initial :class:`LSTMState`, each field ``(B, H)`` (``(H,)``
        unbatched); zeros when ``None``.
      seq_lengths: optional ``(B,)`` integers in ``[0, T]`` (a scalar for an
        unbatched sequence). Steps ``t >= L`` leave the state unchanged and
        output zeros; the final state is the state after the last valid step
        (the initial state when ``L = 0``).
      reverse: process time backwards. With ``seq_lengths``, each sequence's
        valid prefix runs from its last valid step to its first (the padding
        stays at the end). Outputs are always in the input's time order.
      time_major: layout of ``xs`` and the outputs.
      unroll: passed to ``jax.lax.scan``.

    Returns:
      ``(hiddens, final_state)``: ``hiddens`` in the layout of ``xs`` with
      ``H`` features (``hiddens[..., t, :]`` is ``a^t``), and the final
      :class:`LSTMState`.

    Works under ``jax.jit`` (the keyword options are static), ``jax.grad``
    and ``jax.vmap``. Bad shapes or dtypes raise at trace time.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlstm
      >>> p = jaxlstm.init_params(jax.random.key(0), input_size=3, hidden_size=5)
      >>> xs = jnp.ones((2, 7, 3))                      # (B, T, I)
      >>> hs, final = jaxlstm.lstm(p, xs, seq_lengths=jnp.array([7, 4]))
      >>> hs.shape, final.hidden.shape
      ((2, 7, 5), (2, 5))
      >>> bool((hs[1, 4:] == 0).all())
      True
    """
    xs, state, lengths = prepare(params, xs, state, seq_lengths, time_major, unroll)
    return _lstm_jit(params, xs, state, lengths, reverse=bool(reverse), time_major=bool(time_major), unroll=unroll)
