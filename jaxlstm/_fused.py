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
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from ._cell import _pre, _step, _update, stacked_weight
from ._params import LSTMParams, LSTMState

Array = jax.Array


class _Residuals(NamedTuple):
    gates: Array  # (T, *B, 4H) post-activation [f1 | g | f2 | f3]
    cells: Array  # (T, *B, H) cell state after each step (held at masked steps)
    u: Optional[Array]  # (T, *B, H) tanh(c @ w_o + b_o), seed cell only


def _valid(steps_t, lengths):
    return None if lengths is None else (steps_t < lengths)[..., None]


def _hold(valid, new: LSTMState, old: LSTMState) -> tuple[LSTMState, Array]:
    """Masked step: past a sequence's length keep the old state and output zeros."""
    if valid is None:
        return new, new.hidden
    held = LSTMState(jnp.where(valid, new.cell, old.cell), jnp.where(valid, new.hidden, old.hidden))
    return held, jnp.where(valid, new.hidden, jnp.zeros_like(new.hidden))


def _masked(hidden, mask):
    return hidden if mask is None else hidden * mask


def _forward_with_residuals(params: LSTMParams, xs, state: LSTMState, steps, lengths, mask, reverse: bool, unroll):
    """Forward scan that also emits what the backward pass needs."""
    w = stacked_weight(params, xs)

    def body(s, inputs):
        x, t = inputs
        cell, hidden, (f1, g, f2, f3), u = _update(params, s.cell, _pre(params, _masked(s.hidden, mask), x, w))
        new, out = _hold(_valid(t, lengths), LSTMState(cell, hidden), s)
        gates = jnp.concatenate([f1, g, f2, f3], axis=-1)
        res = (gates, new.cell, None if params.w_o is None else u)
        return new, (out, res)

    final, (hs, (gates, cells, u)) = jax.lax.scan(body, state, (xs, steps), reverse=reverse, unroll=unroll)
    return hs, final, _Residuals(gates, cells, u)


def _previous(seq, first, steps, lengths, reverse: bool):
    """The value each step saw as its previous state: ``seq`` shifted by one in scan order.

    ``first`` is the state before the first processed step. With lengths and
    ``reverse``, the step ``L - 1`` is the first processed one.
    """
    if not reverse:
        return jnp.concatenate([first[None], seq[:-1]], axis=0)
    shifted = jnp.concatenate([seq[1:], first[None]], axis=0)
    if lengths is None:
        return shifted
    next_valid = steps.reshape((-1,) + (1,) * lengths.ndim) + 1 < lengths[None]
    return jnp.where(next_valid[..., None], shifted, first[None])


def _backward_scan(params: LSTMParams, res: _Residuals, first_cell, dhs, d_final: LSTMState, steps, lengths, mask, reverse, unroll):
    """Reverse of the forward scan: returns ``(dG, dZ, d_initial_state)``.

    Each step reads its gates and writes its gate gradient ``dG`` at the same
    index of the same buffer (and ``dZ`` over ``u`` for the seed cell), so the
    backward pass allocates no ``(T, *B, 4H)`` array of its own: on the CPU a
    fresh large buffer costs a page fault per 4 KiB on every call
    (benchmarks/cpu_effects.py). The previous
    cell state is read by index (``first_cell`` before the first processed step)
    rather than from a shifted copy.
    """
    h = params.hidden_size
    seed = params.w_o is not None
    last = res.cells.shape[0] - 1
    # Transposed once, outside the loop: a per-step ``d @ w.T`` on the CPU is a
    # transposed-operand matmul, measured ~2x slower than ``d @ w_t`` at B=8, H=128
    # (benchmarks/cpu_effects.py).
    w_h_t = params.w_h.T
    w_o_t = params.w_o.T if seed else None

    def body(carry, inputs):
        dh_next, dc_next, buf, u_buf, gates, u_read = carry
        dy, t, i, i_next = inputs  # t: the step (for lengths); i: its index in the buffers
        # ``gates`` and ``u`` of step i were read at the end of the previous iteration,
        # after that iteration's write: a read of row i before the write to row i
        # makes XLA copy the whole buffer on every step.
        if reverse:  # the step processed before i is i + 1 (held steps keep the initial cell)
            cp = jnp.where(i == last, first_cell, res.cells[jnp.minimum(i + 1, last)])
        else:
            cp = jnp.where(i == 0, first_cell, res.cells[jnp.maximum(i - 1, 0)])
        f1, g, f2, f3 = (gates[..., k * h : (k + 1) * h] for k in range(4))
        u = u_read if seed else jnp.tanh(res.cells[i])
        dh = dh_next + dy
        d_f3 = dh * u
        dz = dh * f3 * (1 - u * u)
        dc = dc_next + (dz @ w_o_t if seed else dz)
        d_pre = jnp.concatenate(
            [
                dc * cp * f1 * (1 - f1),
                dc * f2 * (1 - g * g),
                dc * g * f2 * (1 - f2),
                d_f3 * f3 * (1 - f3),
            ],
            axis=-1,
        )
        dh_prev = _masked(d_pre @ w_h_t, mask)
        dc_prev = dc * f1
        valid = _valid(t, lengths)
        if valid is not None:
            d_pre = jnp.where(valid, d_pre, jnp.zeros_like(d_pre))
            dz = jnp.where(valid, dz, jnp.zeros_like(dz))
            dh_prev = jnp.where(valid, dh_prev, dh_next)
            dc_prev = jnp.where(valid, dc_prev, dc_next)
        buf = jax.lax.dynamic_update_index_in_dim(buf, d_pre, i, 0)
        gates = jax.lax.dynamic_index_in_dim(buf, i_next, 0, keepdims=False)
        if seed:
            u_buf = jax.lax.dynamic_update_index_in_dim(u_buf, dz, i, 0)
            u_read = jax.lax.dynamic_index_in_dim(u_buf, i_next, 0, keepdims=False)
        return (dh_prev, dc_prev, buf, u_buf, gates, u_read), None

    # The backward pass visits the indices last..0 (forward scan) or 0..last
    # (reverse scan); i_next is the index it visits after i (clamped at the end,
    # where its read goes unused).
    index = jnp.arange(last + 1, dtype=jnp.int32)
    if reverse:
        first, i_next = 0, jnp.minimum(index + 1, last)
    else:
        first, i_next = last, jnp.maximum(index - 1, 0)
    u0 = res.u[first] if seed else None
    (dh0, dc0, d_pre, dz, _, _), _ = jax.lax.scan(
        body,
        (d_final.hidden, d_final.cell, res.gates, res.u, res.gates[first], u0),
        (dhs, steps, index, i_next),
        reverse=not reverse,
        unroll=unroll,
    )
    return d_pre, dz, LSTMState(dc0, dh0)


def _rows(a):
    return a.reshape(-1, a.shape[-1])


def _param_grads(params: LSTMParams, xs, h_prev, cells, d_pre, dz, mask) -> LSTMParams:
    """Weight gradients as single large matmuls over all ``T * B`` rows."""
    dg = _rows(d_pre)
    if mask is not None:
        h_prev = h_prev * mask[None]
    dw_h = _rows(h_prev).T @ dg
    dw_x = _rows(xs).T @ dg
    db = dg.sum(0)
    if params.w_o is None:
        return LSTMParams(dw_h, dw_x, db, None, None)
    dzr = _rows(dz)
    return LSTMParams(dw_h, dw_x, db, _rows(cells).T @ dzr, dzr.sum(0))


def _add_params(a: LSTMParams, b: LSTMParams) -> LSTMParams:
    return jax.tree.map(jnp.add, a, b)


def _plain_forward(params, xs, state, steps, lengths, mask, reverse, unroll):
    w = stacked_weight(params, xs)

    def body(s, inputs):
        x, t = inputs
        new, _ = _step(params, s, x, mask, w)
        return _hold(_valid(t, lengths), new, s)

    final, hs = jax.lax.scan(body, state, (xs, steps), reverse=reverse, unroll=unroll)
    return hs, final


def _no_grad(mask):
    """Dropout masks are constants: a zero cotangent."""
    return None if mask is None else jnp.zeros_like(mask)


# ---------------------------------------------------------------- full residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused(params, xs, state, lengths, mask, reverse, unroll):
    steps = jnp.arange(xs.shape[0], dtype=jnp.int32)
    return _plain_forward(params, xs, state, steps, lengths, mask, reverse, unroll)


def _fused_fwd(params, xs, state, lengths, mask, reverse, unroll):
    steps = jnp.arange(xs.shape[0], dtype=jnp.int32)
    hs, final, res = _forward_with_residuals(params, xs, state, steps, lengths, mask, reverse, unroll)
    return (hs, final), (params, xs, state, lengths, mask, hs, res)


def _fused_bwd(reverse, unroll, saved, cotangents):
    params, xs, state, lengths, mask, hs, res = saved
    dhs, d_final = cotangents
    steps = jnp.arange(xs.shape[0], dtype=jnp.int32)
    h_prev = _previous(hs, state.hidden, steps, lengths, reverse)
    d_pre, dz, d_state = _backward_scan(params, res, state.cell, dhs, d_final, steps, lengths, mask, reverse, unroll)
    grads = _param_grads(params, xs, h_prev, res.cells, d_pre, dz, mask)
    dxs = d_pre @ params.w_x.T
    return grads, dxs, d_state, None, _no_grad(mask)


_fused.defvjp(_fused_fwd, _fused_bwd)


# ---------------------------------------------------------------- chunked recomputation


def _chunk(a, n, k):
    return a.reshape((n, k) + a.shape[1:])


def _pad_time(xs, lengths, k):
    """Pad ``T`` up to a multiple of ``k``; padded steps are masked out."""
    T = xs.shape[0]
    n = -(-T // k)
    pad = n * k - T
    if pad:
        xs = jnp.concatenate([xs, jnp.zeros((pad,) + xs.shape[1:], xs.dtype)], axis=0)
        if lengths is None:
            lengths = jnp.full(xs.shape[1:-1], T, jnp.int32)
    return xs, lengths, n, T


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _checkpointed(params, xs, state, lengths, mask, reverse, unroll, k):
    steps = jnp.arange(xs.shape[0], dtype=jnp.int32)
    return _plain_forward(params, xs, state, steps, lengths, mask, reverse, unroll)


def _checkpointed_fwd(params, xs, state, lengths, mask, reverse, unroll, k):
    xs_p, lengths_p, n, T = _pad_time(xs, lengths, k)
    steps = _chunk(jnp.arange(n * k, dtype=jnp.int32), n, k)

    def chunk_body(s, inputs):
        x, t = inputs
        hs, new = _plain_forward(params, x, s, t, lengths_p, mask, reverse, unroll)
        return new, (hs, s)

    final, (hs, starts) = jax.lax.scan(chunk_body, state, (_chunk(xs_p, n, k), steps), reverse=reverse)
    hs = hs.reshape((n * k,) + hs.shape[2:])[:T]
    return (hs, final), (params, xs, state, lengths, mask, starts)


def _checkpointed_bwd(reverse, unroll, k, saved, cotangents):
    params, xs, state, lengths, mask, starts = saved
    dhs, d_final = cotangents
    xs_p, lengths_p, n, T = _pad_time(xs, lengths, k)
    pad = n * k - T
    if pad:
        dhs = jnp.concatenate([dhs, jnp.zeros((pad,) + dhs.shape[1:], dhs.dtype)], axis=0)
    steps = _chunk(jnp.arange(n * k, dtype=jnp.int32), n, k)
    zero_grads = jax.tree.map(jnp.zeros_like, params)

    def chunk_body(carry, inputs):
        d_state, grads = carry
        x, dy, t, start = inputs
        hs, _, res = _forward_with_residuals(params, x, start, t, lengths_p, mask, reverse, unroll)
        h_prev = _previous(hs, start.hidden, t, lengths_p, reverse)
        d_pre, dz, d_start = _backward_scan(params, res, start.cell, dy, d_state, t, lengths_p, mask, reverse, unroll)
        grads = _add_params(grads, _param_grads(params, x, h_prev, res.cells, d_pre, dz, mask))
        return (d_start, grads), d_pre @ params.w_x.T

    (d_state, grads), dxs = jax.lax.scan(
        chunk_body,
        (d_final, zero_grads),
        (_chunk(xs_p, n, k), _chunk(dhs, n, k), steps, starts),
        reverse=not reverse,
    )
    dxs = dxs.reshape((n * k,) + dxs.shape[2:])[:T]
    return grads, dxs, d_state, None, _no_grad(mask)


_checkpointed.defvjp(_checkpointed_fwd, _checkpointed_bwd)


def _without_padding(xs, lengths):
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


def scan_time_major(params, xs, state, lengths, mask, *, reverse, unroll, backward, checkpoint_every):
    """Dispatch to the autodiff scan, the fused backward, or the chunked fused backward."""
    if xs.shape[0] == 0:  # nothing to scan: no outputs, the state passes through (and so does its gradient)
        return jnp.zeros(xs.shape[:-1] + (params.hidden_size,), xs.dtype), state
    if lengths is not None:
        xs, lengths = _without_padding(xs, lengths)
    if mask is not None:
        mask = jax.lax.stop_gradient(mask)
    if backward == "autodiff":
        steps = jnp.arange(xs.shape[0], dtype=jnp.int32)
        if checkpoint_every is None:
            return _plain_forward(params, xs, state, steps, lengths, mask, reverse, unroll)
        return _autodiff_checkpointed(params, xs, state, lengths, mask, reverse, unroll, checkpoint_every)
    if checkpoint_every is None:
        return _fused(params, xs, state, lengths, mask, reverse, unroll)
    return _checkpointed(params, xs, state, lengths, mask, reverse, unroll, checkpoint_every)


def _autodiff_checkpointed(params, xs, state, lengths, mask, reverse, unroll, k):
    """Autodiff path with ``jax.checkpoint`` around each chunk of ``k`` steps."""
    xs_p, lengths_p, n, T = _pad_time(xs, lengths, k)
    steps = _chunk(jnp.arange(n * k, dtype=jnp.int32), n, k)

    @jax.checkpoint
    def chunk_body(s, inputs):
        x, t = inputs
        hs, new = _plain_forward(params, x, s, t, lengths_p, mask, reverse, unroll)
        return new, hs

    final, hs = jax.lax.scan(chunk_body, state, (_chunk(xs_p, n, k), steps), reverse=reverse)
    return hs.reshape((n * k,) + hs.shape[2:])[:T], final
