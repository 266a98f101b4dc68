"""The fast path: a hand-written backward pass through time (``jax.custom_vjp``).

Autodiff through ``lax.scan`` adds every step's outer products into the weight
gradients inside the loop. Here the backward pass is a lean reverse scan that
only propagates ``(dh, dc)`` and emits each step's gate gradient ``dG``
``(B, 4H)``; the weight gradients are then one large matmul over all ``T*B``
rows::

    dW_h = H_prev^T @ dG      dW_x = X^T @ dG      db = sum(dG)
    dW_o = C^T @ dZ           db_o = sum(dZ)       dX = dG @ W_x^T

The forward pass saves the post-activation gates, the cell states and (seed
cell) ``u = tanh(c @ w_o + b_o)``. With ``checkpoint_every=k`` it saves only
the state at the start of every chunk of ``k`` steps and recomputes a chunk's
residuals during the backward pass, so memory grows with ``T / k + k`` instead
of ``T``; weight gradients are then accumulated chunk by chunk.

All arrays here are time-major: ``xs`` ``(T, *B, I)``.

One routine, :func:`chunk_backward`, runs the backward pass over a stretch
of time from its residuals; the full-residual backward calls it once over the
whole sequence, the checkpointed backward once per recomputed chunk.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import _vma
from ._cell import hold, masked, pre_activations, update, valid_at
from ._scan import chunk, pad_steps, pad_time, plain_forward, stacked_weight
from ._types import Array, LSTMParams, LSTMState


class Residuals(NamedTuple):
    """What the forward pass keeps for the backward pass."""

    gates: Array  # (T, *B, 4H) post-activation [f1 | i | f2 | f3]
    cells: Array  # (T, *B, H) cell state after each step (held at masked steps)
    u: Array | None  # (T, *B, H) tanh(c @ w_o + b_o), output-map cell only


def forward_with_residuals(
    params: LSTMParams,
    xs: Array,
    state: LSTMState,
    valid: Array | None,
    mask: Array | None,
    reverse: bool,
    unroll: int | bool,
) -> tuple[Array, LSTMState, Residuals]:
    """Forward scan that also emits what the backward pass needs."""
    w = stacked_weight(params, xs)

    def body(s: LSTMState, inputs: tuple[Array, Array | None]) -> tuple[LSTMState, tuple[Array, tuple]]:
        x, v = inputs
        cell, hidden, (f1, i, f2, f3), u = update(params, s.cell, pre_activations(params, masked(s.hidden, mask), x, w))
        new, out = hold(valid_at(v), LSTMState(cell, hidden), s)
        gates = jnp.concatenate([f1, i, f2, f3], axis=-1)
        res = (gates, new.cell, None if params.w_o is None else u)
        return new, (out.astype(x.dtype), res)

    final, (hs, (gates, cells, u)) = jax.lax.scan(body, state, (xs, valid), reverse=reverse, unroll=unroll)
    return hs, final, Residuals(gates, cells, u)


def previous(seq: Array, first: Array, valid: Array | None, reverse: bool) -> Array:
    """The hidden state each step saw: the output of the valid step processed before it.

    ``seq`` holds the outputs (zero at invalid steps) and ``first`` the state
    before the first processed step. Without a mask this is ``seq`` shifted by
    one in scan order; with one, each step reads the output of the nearest
    valid step before it in scan order (``first`` if there is none). Rows of
    invalid steps are never used.
    """
    if valid is None:
        if not reverse:
            return jnp.concatenate([first[None], seq[:-1]], axis=0)
        return jnp.concatenate([seq[1:], first[None]], axis=0)
    num_steps = seq.shape[0]
    t = jnp.arange(num_steps, dtype=jnp.int32).reshape((num_steps,) + (1,) * (valid.ndim - 1))
    if not reverse:  # the last valid step before t
        last = jax.lax.cummax(jnp.where(valid, t, -1), axis=0)
        source = jnp.concatenate([jnp.full_like(last[:1], -1), last[:-1]], axis=0)
        found = source >= 0
    else:  # the first valid step after t
        nxt = jax.lax.cummin(jnp.where(valid, t, num_steps), axis=0, reverse=True)
        source = jnp.concatenate([nxt[1:], jnp.full_like(nxt[:1], num_steps)], axis=0)
        found = source < num_steps
    read = jnp.take_along_axis(seq, jnp.clip(source, 0, num_steps - 1)[..., None], axis=0)
    return jnp.where(found[..., None], read, first[None])


def backward_scan(
    params: LSTMParams,
    res: Residuals,
    first_cell: Array,
    dhs: Array,
    d_final: LSTMState,
    valid: Array | None,
    mask: Array | None,
    reverse: bool,
) -> tuple[Array, Array | None, LSTMState, Array | None]:
    """Reverse of the forward scan: returns ``(dG, dZ, d_initial_state, dA)``.

    ``dA`` ``(T, *B, P)`` (with a projection only, else ``None``) is each
    valid step's gradient of its hidden state ``a = γ_o W_hr``, for ``dW_hr``.

    Each step reads its gates and writes its gate gradient ``dG`` at the same
    index of the same buffer (and ``dZ`` over ``u`` for the output-map cell), so the
    backward pass allocates no ``(T, *B, 4H)`` array of its own: on the CPU a
    fresh large buffer costs a page fault per 4 KiB on every call
    (benchmarks/cpu_effects.py). The previous
    cell state is read by index (``first_cell`` before the first processed step)
    rather than from a shifted copy. The loop is never unrolled (``unroll``
    applies to the forward scan only): in an unrolled body XLA copies the
    carried buffers instead of writing them in place, and a training step at
    T = 500 became many times slower with ``unroll=4``.
    """
    h = params.hidden_size
    has_output_map = params.w_o is not None
    last = res.cells.shape[0] - 1
    acc = res.cells.dtype  # the state's dtype: float32 under half precision
    # Transposed once, outside the loop: a per-step ``d @ w.T`` on the CPU is a
    # transposed-operand matmul, measured 1.7-2x slower than ``d @ w_t`` at B=8, H=128
    # (benchmarks/cpu_effects.py).
    w_h_t = params.w_h.T.astype(acc)
    w_o_t = params.w_o.T.astype(acc) if params.w_o is not None else None
    w_hr_t = params.w_hr.T.astype(acc) if params.w_hr is not None else None

    def body(carry: tuple, inputs: tuple) -> tuple[tuple, None]:
        dh_next, dc_next, buf, u_buf, gates, u_read, da_buf = carry
        dy, v, row, row_next = inputs  # v: is the step valid; row: its index in the buffers
        # ``gates`` and ``u`` of this row were read at the end of the previous iteration,
        # after that iteration's write: a read of a row before the write to that row
        # makes XLA copy the whole buffer on every step.
        if reverse:  # the step processed before this row is row + 1 (held steps keep the initial cell)
            cp = jnp.where(row == last, first_cell, res.cells[jnp.minimum(row + 1, last)])
        else:
            cp = jnp.where(row == 0, first_cell, res.cells[jnp.maximum(row - 1, 0)])
        f1, i, f2, f3 = (gates[..., k * h : (k + 1) * h] for k in range(4))
        u = u_read if has_output_map else jnp.tanh(res.cells[row])
        dh = dh_next + dy.astype(acc)
        dm = dh if w_hr_t is None else dh @ w_hr_t  # the gradient of γ_o (through the projection, if any)
        d_f3 = dm * u
        dz = dm * f3 * (1 - u * u)
        dc = dc_next + (dz @ w_o_t if has_output_map else dz)
        d_pre = jnp.concatenate(
            [
                dc * cp * f1 * (1 - f1),
                dc * f2 * (1 - i * i),
                dc * i * f2 * (1 - f2),
                d_f3 * f3 * (1 - f3),
            ],
            axis=-1,
        )
        dh_prev = masked(d_pre @ w_h_t, mask)
        dc_prev = dc * f1
        keep = valid_at(v)
        if keep is not None:
            d_pre = jnp.where(keep, d_pre, jnp.zeros_like(d_pre))
            dz = jnp.where(keep, dz, jnp.zeros_like(dz))
            dh_prev = jnp.where(keep, dh_prev, dh_next)
            dc_prev = jnp.where(keep, dc_prev, dc_next)
        if da_buf is not None:
            da = dh if keep is None else jnp.where(keep, dh, jnp.zeros_like(dh))
            da_buf = jax.lax.dynamic_update_index_in_dim(da_buf, da, row, 0)
        buf = jax.lax.dynamic_update_index_in_dim(buf, d_pre, row, 0)
        gates = jax.lax.dynamic_index_in_dim(buf, row_next, 0, keepdims=False)
        if has_output_map:
            u_buf = jax.lax.dynamic_update_index_in_dim(u_buf, dz, row, 0)
            u_read = jax.lax.dynamic_index_in_dim(u_buf, row_next, 0, keepdims=False)
        return (dh_prev, dc_prev, buf, u_buf, gates, u_read, da_buf), None

    # The backward pass visits the indices last..0 (forward scan) or 0..last
    # (reverse scan); row_next is the index it visits after row (clamped at the end,
    # where its read goes unused).
    index = jnp.arange(last + 1, dtype=jnp.int32)
    if reverse:
        first, row_next = 0, jnp.minimum(index + 1, last)
    else:  # -1, not ``last``: a static index also when T is a symbolic size (jax.export)
        first, row_next = -1, jnp.maximum(index - 1, 0)
    u0 = res.u[first] if res.u is not None else None
    da0 = None if w_hr_t is None else jnp.zeros(res.cells.shape[:-1] + (params.output_size,), acc)
    da0 = _vma.vary(da0, _vma.axes(res.cells))  # inside shard_map: varying as the values written into it
    (dh0, dc0, d_pre, dz, _, _, da), _ = jax.lax.scan(
        body,
        (d_final.hidden, d_final.cell, res.gates, res.u, res.gates[first], u0, da0),
        (dhs, valid, index, row_next),
        reverse=not reverse,
    )
    return d_pre, dz, LSTMState(dc0, dh0), da


def _outer_sum(a: Array, b: Array) -> Array:
    """``sum over every leading axis of a[..., i] * b[..., j]``: ``(I, J)``, one matmul over all ``T * B`` rows.

    A dot over the leading axes rather than a reshape to ``(T * B, .)`` first: under a batch split over
    devices (``jit`` with sharded inputs) the reshape would merge the split batch axis into the time axis,
    and XLA would gather the whole batch onto every device to compute it.
    """
    lead = tuple(range(a.ndim - 1))
    return jax.lax.dot_general(a, b, ((lead, lead), ((), ())), out_sharding=_vma.outer_sharding(a, b))


def _lead_sum(a: Array) -> Array:
    return a.sum(tuple(range(a.ndim - 1)))


def param_grads(
    params: LSTMParams,
    xs: Array,
    h_prev: Array,
    cells: Array,
    d_pre: Array,
    dz: Array | None,
    mask: Array | None,
    gamma_o: Array | None = None,
    da: Array | None = None,
) -> LSTMParams:
    """Weight gradients as single large matmuls over all ``T * B`` rows, in ``d_pre``'s dtype.

    With a projection, ``gamma_o`` ``(T, *B, H)`` and ``da`` ``(T, *B, P)`` give ``dW_hr``.
    """
    dg = d_pre
    acc = dg.dtype
    h_prev = h_prev.astype(acc)
    if mask is not None:
        h_prev = h_prev * mask[None].astype(acc)
    dw_h = _outer_sum(h_prev, dg)
    dw_x = _outer_sum(xs.astype(acc), dg)
    db = _lead_sum(dg)
    dw_hr = None
    if params.w_hr is not None and gamma_o is not None and da is not None:
        dw_hr = _outer_sum(gamma_o, da)
    if params.w_o is None or dz is None:
        return LSTMParams(dw_h, dw_x, db, None, None, dw_hr)
    return LSTMParams(dw_h, dw_x, db, _outer_sum(cells, dz), _lead_sum(dz), dw_hr)


def _add_params(a: LSTMParams, b: LSTMParams) -> LSTMParams:
    return jax.tree.map(jnp.add, a, b)


def as_dtypes_of(grads: LSTMParams, params: LSTMParams) -> LSTMParams:
    """Gradients rounded to their parameters' dtypes (a no-op but under half precision)."""
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


def no_grad(mask: Array | None) -> Array | None:
    """Dropout masks are constants: a zero cotangent."""
    return None if mask is None else jnp.zeros_like(mask)


def chunk_backward(
    params: LSTMParams,
    xs: Array,
    start: LSTMState,
    res: Residuals,
    hs: Array,
    dhs: Array,
    d_end: LSTMState,
    valid: Array | None,
    mask: Array | None,
    reverse: bool,
    unroll: int | bool,
    reverse_pass: Callable[..., tuple] | None = None,
) -> tuple[LSTMParams, Array, LSTMState]:
    """The backward pass over one stretch of time: ``(weight gradients, dxs, d_start)``.

    ``start`` is the state before the stretch's first processed step, ``res``
    and ``hs`` its forward residuals and outputs, ``dhs`` the outputs'
    cotangents and ``d_end`` the cotangent of the state after it.
    ``reverse_pass`` (default :func:`backward_scan`, with its arguments and
    results) runs the loop over time; the Pallas path passes its kernel there.
    """
    h_prev = previous(hs.astype(start.hidden.dtype), start.hidden, valid, reverse)
    gamma_o = None
    if params.w_hr is not None:  # read before the backward scan overwrites the gates with their gradients
        h = params.hidden_size
        u = res.u if res.u is not None else jnp.tanh(res.cells)
        gamma_o = res.gates[..., 3 * h :] * u
    d_pre, dz, d_start, da = (reverse_pass or backward_scan)(params, res, start.cell, dhs, d_end, valid, mask, reverse)
    grads = param_grads(params, xs, h_prev, res.cells, d_pre, dz, mask, gamma_o, da)
    dxs = (d_pre @ params.w_x.T.astype(d_pre.dtype)).astype(xs.dtype)
    return grads, dxs, d_start


# ---------------------------------------------------------------- full residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def fused(params, xs, state, valid, mask, reverse, unroll):  # type: ignore[no-untyped-def]
    """The layer with every step's residuals kept for the hand-written backward pass."""
    return plain_forward(params, xs, state, valid, mask, reverse, unroll)


def _fused_fwd(params, xs, state, valid, mask, reverse, unroll):  # type: ignore[no-untyped-def]
    hs, final, res = forward_with_residuals(params, xs, state, valid, mask, reverse, unroll)
    return (hs, final), (params, xs, state, valid, mask, hs, res)


def _fused_bwd(reverse, unroll, saved, cotangents):  # type: ignore[no-untyped-def]
    params, xs, state, valid, mask, hs, res = saved
    dhs, d_final = cotangents
    grads, dxs, d_state = chunk_backward(params, xs, state, res, hs, dhs, d_final, valid, mask, reverse, unroll)
    return as_dtypes_of(grads, params), dxs, d_state, None, no_grad(mask)


fused.defvjp(_fused_fwd, _fused_bwd)


# ---------------------------------------------------------------- chunked recomputation


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def checkpointed(params, xs, state, valid, mask, reverse, unroll, k):  # type: ignore[no-untyped-def]
    """The layer keeping only each chunk's start state; a chunk's residuals are recomputed backwards."""
    return plain_forward(params, xs, state, valid, mask, reverse, unroll)


def _chunked(a: Array | None, n: int, k: int) -> Array | None:
    return None if a is None else chunk(a, n, k)


def _checkpointed_fwd(params, xs, state, valid, mask, reverse, unroll, k):  # type: ignore[no-untyped-def]
    xs_p, valid_p, n, T = pad_time(xs, valid, k)

    def chunk_body(s: LSTMState, inputs: tuple) -> tuple[LSTMState, tuple[Array, LSTMState]]:
        x, v = inputs
        hs, new = plain_forward(params, x, s, v, mask, reverse, unroll)
        return new, (hs, s)

    final, (hs, starts) = jax.lax.scan(chunk_body, state, (chunk(xs_p, n, k), _chunked(valid_p, n, k)), reverse=reverse)
    hs = hs.reshape((n * k,) + hs.shape[2:])[:T]
    return (hs, final), (params, xs, state, valid, mask, starts)


def _checkpointed_bwd(reverse, unroll, k, saved, cotangents):  # type: ignore[no-untyped-def]
    params, xs, state, valid, mask, starts = saved
    dhs, d_final = cotangents
    xs_p, valid_p, n, T = pad_time(xs, valid, k)
    pad = n * k - T
    if pad:
        dhs = pad_steps(dhs, pad)
    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, state.cell.dtype), params)  # summed in the state's dtype
    zero_grads = _vma.vary(zero_grads, _vma.axes(xs))  # inside shard_map: varying as the grads added to them

    def chunk_body(carry: tuple, inputs: tuple) -> tuple[tuple, Array]:
        d_state, grads = carry
        x, dy, v, start = inputs
        hs, _, res = forward_with_residuals(params, x, start, v, mask, reverse, unroll)
        g, dx, d_start = chunk_backward(params, x, start, res, hs, dy, d_state, v, mask, reverse, unroll)
        return (d_start, _add_params(grads, g)), dx

    (d_state, grads), dxs = jax.lax.scan(
        chunk_body,
        (d_final, zero_grads),
        (chunk(xs_p, n, k), chunk(dhs, n, k), _chunked(valid_p, n, k), starts),
        reverse=not reverse,
    )
    dxs = dxs.reshape((n * k,) + dxs.shape[2:])[:T]
    return as_dtypes_of(grads, params), dxs, d_state, None, no_grad(mask)


checkpointed.defvjp(_checkpointed_fwd, _checkpointed_bwd)
