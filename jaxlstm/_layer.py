"""One LSTM layer over a whole sequence: ``jax.lax.scan`` of the cell step."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from . import _errors
from ._fused import scan_time_major
from ._params import LSTMParams, LSTMState, check_params, zero_state

Array = jax.Array


def _check_unroll(unroll) -> None:
    if isinstance(unroll, bool):
        return
    if not isinstance(unroll, int) or unroll < 1:
        raise ValueError(f"unroll must be a positive int or a bool; received {unroll!r}.")


BACKWARDS = ("fused", "autodiff")


def _check_backward(backward, checkpoint_every) -> None:
    if backward not in BACKWARDS:
        raise ValueError(
            f"backward must be one of {BACKWARDS}; received {backward!r}. Use 'autodiff' for forward-mode "
            "differentiation (jax.jvp, jax.hessian), 'fused' otherwise."
        )
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1
    ):
        raise ValueError(
            f"checkpoint_every must be None or a positive int (steps per recomputed chunk); received {checkpoint_every!r}."
        )


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


@functools.partial(jax.jit, static_argnames=("reverse", "time_major", "unroll", "backward", "checkpoint_every"))
def _lstm_jit(params, xs, state, lengths, mask, *, reverse, time_major, unroll, backward, checkpoint_every):
    batched_batch_major = xs.ndim == 3 and not time_major
    if batched_batch_major:
        xs = jnp.swapaxes(xs, 0, 1)
    hs, final = scan_time_major(
        params, xs, state, lengths, mask, reverse=reverse, unroll=unroll, backward=backward, checkpoint_every=checkpoint_every
    )
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
    backward: str = "fused",
    checkpoint_every: Optional[int] = None,
    recurrent_mask: Optional[Array] = None,
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
        (the initial state when ``L = 0``). Whatever the padded steps of
        ``xs`` hold (NaN and inf included) never reaches the outputs or the
        gradients. Concrete lengths outside ``[0, T]`` raise a ``ValueError``;
        traced ones (inside ``jax.jit``) cannot be checked and are clamped to
        ``[0, T]``.
      reverse: process time backwards. With ``seq_lengths``, each sequence's
        valid prefix runs from its last valid step to its first (the padding
        stays at the end). Outputs are always in the input's time order.
      time_major: layout of ``xs`` and the outputs.
      unroll: passed to ``jax.lax.scan``.
      backward: ``"fused"`` (default): a hand-written backward pass through
        time (``jax.custom_vjp``) that forms the weight gradients as one large
        matmul after the reverse scan; fastest for training, supports
        ``jax.grad``/``jax.vjp`` (also to second order in reverse mode).
        ``"autodiff"``: plain autodiff through ``lax.scan``; use it for
        forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``).
      checkpoint_every: ``None`` (default) keeps every step's gates for the
        backward pass (memory ``O(T)``). An int ``k`` keeps only the state at
        the start of each chunk of ``k`` steps and recomputes a chunk's gates
        during the backward pass: memory ``O(T/k + k)`` for about one extra
        forward pass of compute. ``k ~ sqrt(T)`` is a good choice for very
        long sequences. Results are identical.
      recurrent_mask: optional ``(B, H)`` (``(H,)`` unbatched) multiplier of
        ``a^{t-1}`` where it enters the gates, the same at every step: this is
        variational recurrent dropout (Gal & Ghahramani, 2016) when it holds
        ``bernoulli(1 - rate) / (1 - rate)``. Treated as a constant (no
        gradient).

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
    _check_backward(backward, checkpoint_every)
    if recurrent_mask is not None:
        recurrent_mask = _errors.check_mask(recurrent_mask, state.hidden.shape, params.dtype)
    try:
        return _lstm_jit(
            params,
            xs,
            state,
            lengths,
            recurrent_mask,
            reverse=bool(reverse),
            time_major=bool(time_major),
            unroll=unroll,
            backward=backward,
            checkpoint_every=checkpoint_every,
        )
    except TypeError as e:
        if "forward-mode" not in str(e):
            raise
        raise TypeError(
            f'forward-mode differentiation (jax.jvp, jax.jacfwd, jax.hessian) reached the hand-written backward pass '
            f'(backward="{backward}"), which supports reverse mode only. Pass backward="autodiff" to '
            "jaxlstm.lstm (or the stack, bidirectional layer or module) for forward mode."
        ) from None
