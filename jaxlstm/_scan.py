"""Time-major scans without a hand-written gradient, and the pieces they share with :mod:`jaxlstm._bptt`.

All arrays here are time-major: ``xs`` ``(T, *B, I)``. Which steps count is
one boolean array ``valid`` ``(T, *B)`` (``None``: every step), built from
``seq_lengths`` and/or a step mask; at an invalid step the state is held and
the output is zero (:func:`jaxlstm._cell.hold`). ``mask`` is the recurrent dropout mask
``(*B, H)``. Platform-dependent choices (the stacked matmul) are made at
trace time from ``jax.default_backend()``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from . import _feature_major
from ._cell import hold, step, valid_at
from ._types import Array, LSTMParams, LSTMState, static

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
    if not static(*xs.shape[1:-1]):  # a symbolic batch: one matmul, the choice at small sizes (serving)
        return jnp.concatenate([params.w_h, params.w_x], axis=0)
    batch = math.prod(xs.shape[1:-1])
    limit = STACKED_MAX_ELEMENTS.get(jax.default_backend(), _DEFAULT_STACKED_MAX)
    if batch * (params.output_size + params.input_size) > limit:
        return None
    return jnp.concatenate([params.w_h, params.w_x], axis=0)


def step_validity(lengths: Array | None, step_mask: Array | None, num_steps: int) -> Array | None:
    """``valid`` ``(T, *B)``: the step mask (time-major) and ``t < L``, whichever are given; ``None`` if neither."""
    valid = step_mask
    if lengths is not None:
        steps = jnp.arange(num_steps, dtype=jnp.int32).reshape((num_steps,) + (1,) * lengths.ndim)
        by_length = steps < lengths[None]
        valid = by_length if valid is None else valid & by_length
    return valid


def plain_forward(
    params: LSTMParams,
    xs: Array,
    state: LSTMState,
    valid: Array | None,
    mask: Array | None,
    reverse: bool,
    unroll: int | bool,
    compute_dtype: Any = None,
) -> tuple[Array, LSTMState]:
    """The forward scan with no residuals: ``(hiddens (T, *B, H), final state)``.

    With ``compute_dtype`` (autodiff under half precision) ``params`` come in
    float32 and are rounded to it inside the loop, so that autodiff sums the
    per-step weight gradients in float32. Where it is faster (large hidden
    sizes, :func:`jaxlstm._feature_major.applies`) the scan runs feature-major.
    """
    if compute_dtype is None and _feature_major.applies(params, xs):
        return _feature_major.forward(params, xs, state, valid, mask, reverse, unroll)
    w = stacked_weight(params, xs)

    def body(s: LSTMState, inputs: tuple[Array, Array | None]) -> tuple[LSTMState, Array]:
        x, v = inputs
        p, w_s = params, w
        if compute_dtype is not None:
            p = jax.tree.map(lambda a: a.astype(compute_dtype), params)
            w_s = None if w is None else w.astype(compute_dtype)
        new, _ = step(p, s, x, mask, w_s)
        held, out = hold(valid_at(v), new, s)
        return held, out.astype(x.dtype)

    final, hs = jax.lax.scan(body, state, (xs, valid), reverse=reverse, unroll=unroll)
    return hs, final


def chunk(a: Array, n: int, k: int) -> Array:
    """``(n * k, ...)`` -> ``(n, k, ...)``."""
    return a.reshape((n, k) + a.shape[1:])


def pad_time(xs: Array, valid: Array | None, k: int) -> tuple[Array, Array | None, int, int]:
    """Pad ``T`` up to a multiple of ``k``; padded steps are invalid."""
    T = xs.shape[0]
    n = -(-T // k)
    pad = n * k - T
    if pad:  # padded from the arrays themselves, so that a batch split over devices stays split
        if valid is None:
            valid = jnp.ones_like(xs[..., 0], dtype=bool)
        xs = pad_steps(xs, pad)
        valid = pad_steps(valid, pad)
    return xs, valid, n, T


def pad_steps(a: Array, pad: int) -> Array:
    """``a`` ``(T, ...)`` followed by ``pad`` steps of zeros (``False``)."""
    return jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1))


def without_padding(xs: Array, valid: Array) -> Array:
    """``xs`` with its invalid steps zeroed.

    Invalid steps never reach the outputs, but their inputs still pass through
    the step's arithmetic (the state is held afterwards). A NaN or inf there
    would turn into a NaN gradient (``0 * nan``) in both backward passes, so
    they are replaced by zeros first; their gradient is zero.
    """
    return jnp.where(valid[..., None], xs, jnp.zeros((), xs.dtype))


def autodiff_checkpointed(
    params: LSTMParams,
    xs: Array,
    state: LSTMState,
    valid: Array | None,
    mask: Array | None,
    reverse: bool,
    unroll: int | bool,
    k: int,
    compute_dtype: Any = None,
) -> tuple[Array, LSTMState]:
    """Autodiff path with ``jax.checkpoint`` around each chunk of ``k`` steps."""
    xs_p, valid_p, n, T = pad_time(xs, valid, k)

    @jax.checkpoint
    def chunk_body(s: LSTMState, inputs: tuple[Array, Array | None]) -> tuple[LSTMState, Array]:
        x, v = inputs
        hs, new = plain_forward(params, x, s, v, mask, reverse, unroll, compute_dtype)
        return new, hs

    chunks = (chunk(xs_p, n, k), None if valid_p is None else chunk(valid_p, n, k))
    final, hs = jax.lax.scan(chunk_body, state, chunks, reverse=reverse)
    return hs.reshape((n * k,) + hs.shape[2:])[:T], final
