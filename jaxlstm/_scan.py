"""Time-major scans without a hand-written gradient, and the pieces they share with :mod:`jaxlstm._bptt`.

All arrays here are time-major: ``xs`` ``(T, *B, I)``. The padding of a
sequence (steps ``t >= L``) is handled by holding the state and writing zeros
(:func:`hold`); platform-dependent choices (the stacked matmul) are made at
trace time from ``jax.default_backend()``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ._cell import step
from ._types import Array, LSTMParams, LSTMState

#: Per platform: above this many ``[a, x]`` entries per step (``B * (H + I)``) the per-step
#: concatenation costs more than the second matmul launch it saves. Measured on the CPU with
#: benchmarks/speed.py; the other platforms use the CPU's figure until measured there.
STACKED_MAX_ELEMENTS = {"cpu": 65536}
_DEFAULT_STACKED_MAX = 65536


def stacked_weight(params: LSTMParams, xs: Array) -> Array | None:
    """``[w_h; w_x]`` ``(H + I, 4H)`` for one matmul of ``[a, x]`` per step, or ``None``.

    Built once outside the loop. One larger matmul per step beats two small
    ones at small and medium sizes (fewer kernels per step); for large
    ``B * (H + I)`` the per-step concatenation costs more, and two matmuls are used.
    """
    batch = math.prod(xs.shape[1:-1])
    limit = STACKED_MAX_ELEMENTS.get(jax.default_backend(), _DEFAULT_STACKED_MAX)
    if batch * (params.hidden_size + params.input_size) > limit:
        return None
    return jnp.concatenate([params.w_h, params.w_x], axis=0)


def valid_at(steps_t: Array, lengths: Array | None) -> Array | None:
    """``(..., 1)`` true where step ``t`` is inside the sequence (``None``: no lengths, all valid)."""
    return None if lengths is None else (steps_t < lengths)[..., None]


def hold(valid: Array | None, new: LSTMState, old: LSTMState) -> tuple[LSTMState, Array]:
    """Masked step: past a sequence's length keep the old state and output zeros."""
    if valid is None:
        return new, new.hidden
    held = LSTMState(jnp.where(valid, new.cell, old.cell), jnp.where(valid, new.hidden, old.hidden))
    return held, jnp.where(valid, new.hidden, jnp.zeros_like(new.hidden))


def masked(hidden: Array, mask: Array | None) -> Array:
    """``hidden * mask`` (the recurrent dropout mask), or ``hidden``."""
    return hidden if mask is None else hidden * mask


def plain_forward(
    params: LSTMParams,
    xs: Array,
    state: LSTMState,
    steps: Array,
    lengths: Array | None,
    mask: Array | None,
    reverse: bool,
    unroll: int | bool,
) -> tuple[Array, LSTMState]:
    """The forward scan with no residuals: ``(hiddens (T, *B, H), final state)``."""
    w = stacked_weight(params, xs)

    def body(s: LSTMState, inputs: tuple[Array, Array]) -> tuple[LSTMState, Array]:
        x, t = inputs
        new, _ = step(params, s, x, mask, w)
        return hold(valid_at(t, lengths), new, s)

    final, hs = jax.lax.scan(body, state, (xs, steps), reverse=reverse, unroll=unroll)
    return hs, final


def chunk(a: Array, n: int, k: int) -> Array:
    """``(n * k, ...)`` -> ``(n, k, ...)``."""
    return a.reshape((n, k) + a.shape[1:])


def pad_time(xs: Array, lengths: Array | None, k: int) -> tuple[Array, Array | None, int, int]:
    """Pad ``T`` up to a multiple of ``k``; padded steps are masked out."""
    T = xs.shape[0]
    n = -(-T // k)
    pad = n * k - T
    if pad:
        xs = jnp.concatenate([xs, jnp.zeros((pad,) + xs.shape[1:], xs.dtype)], axis=0)
        if lengths is None:
            lengths = jnp.full(xs.shape[1:-1], T, jnp.int32)
    return xs, lengths, n, T


def without_padding(xs: Array, lengths: Array) -> tuple[Array, Array]:
    """Lengths clamped to ``[0, T]`` and the padded steps of ``xs`` zeroed.

    Padded steps never reach the outputs, but their inputs still pass through
    the step's arithmetic (the state is held afterwards). A NaN or inf there
    would turn into a NaN gradient (``0 * nan``) in both backward passes, so
    the padding is replaced by zeros first; its gradient is zero.
    """
    num_steps = xs.shape[0]
    lengths = jnp.clip(lengths, 0, num_steps)
    steps = jnp.arange(num_steps, dtype=jnp.int32).reshape((num_steps,) + (1,) * lengths.ndim)
    valid = (steps < lengths[None])[..., None]
    return jnp.where(valid, xs, jnp.zeros((), xs.dtype)), lengths


def autodiff_checkpointed(
    params: LSTMParams,
    xs: Array,
    state: LSTMState,
    lengths: Array | None,
    mask: Array | None,
    reverse: bool,
    unroll: int | bool,
    k: int,
) -> tuple[Array, LSTMState]:
    """Autodiff path with ``jax.checkpoint`` around each chunk of ``k`` steps."""
    xs_p, lengths_p, n, T = pad_time(xs, lengths, k)
    steps = chunk(jnp.arange(n * k, dtype=jnp.int32), n, k)

    @jax.checkpoint
    def chunk_body(s: LSTMState, inputs: tuple[Array, Array]) -> tuple[LSTMState, Array]:
        x, t = inputs
        hs, new = plain_forward(params, x, s, t, lengths_p, mask, reverse, unroll)
        return new, hs

    final, hs = jax.lax.scan(chunk_body, state, (chunk(xs_p, n, k), steps), reverse=reverse)
    return hs.reshape((n * k,) + hs.shape[2:])[:T], final
