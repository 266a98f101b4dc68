"""The Pallas path: the whole recurrence in one kernel, forward and backward.

The input projection ``x @ W_x + b`` of every step is one large matmul outside
the kernel (``(T * B, I) @ (I, 4H)``). The kernel then runs the time loop
itself, with the recurrent weights ``W_h`` (and ``W_o``) read by every step of
the loop and the state ``(c, a)`` carried in registers: per step, the four
``a @ W_h`` blocks, the gate arithmetic, ``c @ W_o`` (output-map cell) and the
writes of the outputs and residuals, with no kernel launch between steps (the
persistent-RNN idea). The backward kernel runs the reverse loop the same way,
propagating ``(da, dc)`` and writing each step's gate gradient; the weight
gradients stay large matmuls over all ``T * B`` rows outside the loop
(:func:`jaxlstm._bptt.param_grads`), exactly as on the scan path.

Both kernels read and write the residual layout of :mod:`jaxlstm._bptt`
(:class:`~jaxlstm._bptt.Residuals`), so the two paths share everything but the
loops. Every gate block is addressed through its own slice of a weight or
residual buffer (never by slicing a loaded value), which is what Triton needs.

Support: both cells, ``seq_lengths`` and step masks (``valid``), recurrent
dropout masks, ``reverse``, float32 and half-precision weights (float32 state,
gate arithmetic and accumulation); not the projection (``proj_size``) or
``checkpoint_every``. On a GPU the kernel lowers through Triton, whose
blocks must have power-of-two sides of at least 16: ``B``, ``H`` (and
``4H``) must be powers of two, ``B >= 16`` and ``H >= 16``. On a TPU it lowers
through Mosaic, which wants ``H`` a multiple of 128; there the whole
sequence's buffers sit in on-chip memory (VMEM), which bounds ``T * B * H``.
``interpret=True`` runs the same kernels on any platform (the CPU tests).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._bptt import Residuals, as_dtypes_of, backward_scan, chunk_backward, forward_with_residuals, no_grad
from ._cell import add_bias
from ._precision import matmul
from ._scan import plain_forward
from ._types import Array, LSTMParams, LSTMState


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def unsupported(params: LSTMParams, xs: Array, platform: str | None, *, checkpoint_every: Any) -> list[str]:
    """Why this layer call cannot run on the Pallas kernels (empty: it can).

    ``platform`` is ``"gpu"`` (Triton), ``"tpu"`` (Mosaic), ``"interpret"``, or
    ``None`` for the options no platform's kernels take (checked wherever
    ``impl="pallas"`` is asked for, whatever the process runs on).
    """
    reasons = []
    if params.w_hr is not None:
        reasons.append("no projection (proj_size)")
    if checkpoint_every is not None:
        reasons.append("no checkpoint_every (the kernels keep every step's residuals)")
    h = params.hidden_size
    batch = math.prod(xs.shape[1:-1])
    if platform == "gpu":
        if not _is_pow2(h) or h < 16:
            reasons.append(f"on a GPU (Triton), a hidden size that is a power of two >= 16 (received {h})")
        if not _is_pow2(batch) or batch < 16:
            reasons.append(f"on a GPU (Triton), a batch that is a power of two >= 16 (received {batch})")
    if platform == "tpu" and h % 128:
        reasons.append(f"on a TPU (Mosaic), a hidden size that is a multiple of 128 (received {h})")
    return reasons


def _load(ref: Any, t: Any, k: int | None = None, h: int = 0) -> Array:
    """Row ``t`` of a time-major buffer ``(T, B, n)``, or gate block ``k`` of it."""
    if k is None:
        return ref[t]
    return ref[t, :, pl.ds(k * h, h)]


def _store(ref: Any, t: Any, value: Array, k: int | None = None, h: int = 0) -> None:
    if k is None:
        ref[t] = value.astype(ref.dtype)
    else:
        ref[t, :, pl.ds(k * h, h)] = value.astype(ref.dtype)


def _row(t: Any, num_steps: int, reverse: bool) -> Any:
    """The buffer index of the ``t``-th processed step."""
    return num_steps - 1 - t if reverse else t


# ---------------------------------------------------------------- the kernels


def _forward_kernel(
    zx_ref,
    valid_ref,
    mask_ref,
    w_h_ref,
    w_o_ref,
    b_o_ref,
    c0_ref,
    h0_ref,
    hs_ref,
    gates_ref,
    cells_ref,
    u_ref,
    c_out_ref,
    h_out_ref,
    *,
    num_steps: int,
    hidden: int,
    reverse: bool,
    output_map: bool,
    save: bool,
):
    acc = c0_ref.dtype
    w_dtype = w_h_ref.dtype
    mask = mask_ref[...].astype(acc)

    def body(t, carry):
        c, a = carry
        row = _row(t, num_steps, reverse)
        a_in = (a * mask).astype(w_dtype)
        pre = [
            _load(zx_ref, row, k, hidden).astype(acc)
            + jnp.dot(a_in, w_h_ref[:, pl.ds(k * hidden, hidden)], preferred_element_type=acc)
            for k in range(4)
        ]
        f1 = jax.nn.sigmoid(pre[0])
        i = jnp.tanh(pre[1])
        f2 = jax.nn.sigmoid(pre[2])
        f3 = jax.nn.sigmoid(pre[3])
        c_new = f1 * c + i * f2
        if output_map:
            u = jnp.tanh(
                jnp.dot(c_new.astype(w_dtype), w_o_ref[...], preferred_element_type=acc) + b_o_ref[...].astype(acc)
            )
        else:
            u = jnp.tanh(c_new)
        a_new = u * f3
        v = _load(valid_ref, row) > 0  # (B, 1)
        c_held = jnp.where(v, c_new, c)
        a_held = jnp.where(v, a_new, a)
        _store(hs_ref, row, jnp.where(v, a_new, jnp.zeros_like(a_new)))
        if save:
            for k, g in enumerate((f1, i, f2, f3)):
                _store(gates_ref, row, g, k, hidden)
            _store(cells_ref, row, c_held)
            if output_map:
                _store(u_ref, row, u)
        return c_held, a_held

    c, a = jax.lax.fori_loop(0, num_steps, body, (c0_ref[...].astype(acc), h0_ref[...].astype(acc)))
    c_out_ref[...] = c.astype(c_out_ref.dtype)
    h_out_ref[...] = a.astype(h_out_ref.dtype)


def _backward_kernel(
    gates_ref,
    cells_ref,
    u_ref,
    dhs_ref,
    valid_ref,
    mask_ref,
    w_h_t_ref,
    w_o_t_ref,
    first_cell_ref,
    dc_end_ref,
    dh_end_ref,
    d_pre_ref,
    dz_ref,
    dc0_ref,
    dh0_ref,
    *,
    num_steps: int,
    hidden: int,
    reverse: bool,
    output_map: bool,
):
    acc = dc_end_ref.dtype
    mask = mask_ref[...].astype(acc)
    last = num_steps - 1
    first_cell = first_cell_ref[...].astype(acc)

    def body(s, carry):
        dh_next, dc_next = carry
        # the backward pass visits the processed steps in the opposite order
        row = _row(num_steps - 1 - s, num_steps, reverse)
        if reverse:
            before = jnp.minimum(row + 1, last)
            cp = jnp.where(row == last, first_cell, _load(cells_ref, before).astype(acc))
        else:
            before = jnp.maximum(row - 1, 0)
            cp = jnp.where(row == 0, first_cell, _load(cells_ref, before).astype(acc))
        f1, i, f2, f3 = (_load(gates_ref, row, k, hidden).astype(acc) for k in range(4))
        if output_map:
            u = _load(u_ref, row).astype(acc)
        else:
            u = jnp.tanh(_load(cells_ref, row).astype(acc))
        dh = dh_next + _load(dhs_ref, row).astype(acc)
        d_f3 = dh * u
        dz = dh * f3 * (1 - u * u)
        if output_map:
            dc = dc_next + jnp.dot(dz, w_o_t_ref[...].astype(acc), preferred_element_type=acc)
        else:
            dc = dc_next + dz
        d_pre = (
            dc * cp * f1 * (1 - f1),
            dc * f2 * (1 - i * i),
            dc * i * f2 * (1 - f2),
            d_f3 * f3 * (1 - f3),
        )
        dh_prev = sum(
            jnp.dot(d_pre[k], w_h_t_ref[pl.ds(k * hidden, hidden), :].astype(acc), preferred_element_type=acc)
            for k in range(4)
        )
        dh_prev = dh_prev * mask
        dc_prev = dc * f1
        v = _load(valid_ref, row) > 0
        for k in range(4):
            _store(d_pre_ref, row, jnp.where(v, d_pre[k], jnp.zeros_like(d_pre[k])), k, hidden)
        if output_map:
            _store(dz_ref, row, jnp.where(v, dz, jnp.zeros_like(dz)))
        return jnp.where(v, dh_prev, dh_next), jnp.where(v, dc_prev, dc_next)

    dh, dc = jax.lax.fori_loop(0, num_steps, body, (dh_end_ref[...].astype(acc), dc_end_ref[...].astype(acc)))
    dc0_ref[...] = dc.astype(dc0_ref.dtype)
    dh0_ref[...] = dh.astype(dh0_ref.dtype)


# ---------------------------------------------------------------- calls


#: Per platform: batch rows per kernel program (the grid runs blocks of the batch in parallel).
#: Not yet tuned on a device (benchmarks/device.py); the batch is split only where it divides evenly.
BLOCK_BATCH = {"gpu": 16, "tpu": 256, "interpret": 0}


def _block_batch(platform: str, batch: int) -> int:
    block = BLOCK_BATCH.get(platform, 0)
    return block if 0 < block < batch and batch % block == 0 else batch


def _origin(rank: int, b: Any) -> tuple:
    return (0,) * rank


def _specs(block: int, arrays: list[tuple[str, tuple]]) -> list:
    """BlockSpecs that cut the batch axis of each array into ``block`` rows: ``"t"`` for
    time-major ``(T, B, n)``, ``"b"`` for ``(B, n)``, ``"w"`` for a whole array (weights)."""
    specs = []
    for kind, shape in arrays:
        if kind == "t" and shape[1] > 1:
            specs.append(pl.BlockSpec((shape[0], block, shape[2]), lambda b: (0, b, 0)))
        elif kind == "b":
            specs.append(pl.BlockSpec((block, shape[1]), lambda b: (b, 0)))
        else:
            specs.append(pl.BlockSpec(shape, functools.partial(_origin, len(shape))))
    return specs


def _compiler_params(platform: str) -> Any:
    if platform == "gpu":
        from jax.experimental.pallas import triton as plt

        return plt.CompilerParams(num_warps=4, num_stages=1)
    return None


def _call(
    kernel: Any, name: str, platform: str, batch: int, args: list, kinds: list, outs: list, out_kinds: list
) -> Any:
    """``pallas_call`` over a grid of batch blocks; ``kinds``, ``out_kinds``: how each array is cut (:func:`_specs`)."""
    block = _block_batch(platform, batch)
    return pl.pallas_call(
        kernel,
        out_shape=outs,
        grid=(batch // block,),
        in_specs=_specs(block, [(k, jnp.shape(a)) for k, a in zip(kinds, args)]),
        out_specs=_specs(block, [(k, o.shape) for k, o in zip(out_kinds, outs)]),
        interpret=platform == "interpret",
        compiler_params=_compiler_params(platform),
        name=name,
    )(*args)


def _flat(a: Array, batch: int) -> Array:
    """``(T, *B, n)`` -> ``(T, B, n)``."""
    return a.reshape((a.shape[0], batch, a.shape[-1]))


def _valid_rows(valid: Array | None, num_steps: int, batch: int, dtype: Any) -> Array:
    if valid is None:
        return jnp.ones((num_steps, batch, 1), dtype)
    return valid.reshape(num_steps, batch, 1).astype(dtype)


def _mask_rows(mask: Array | None, batch: int, hidden: int, dtype: Any) -> Array:
    if mask is None:
        return jnp.ones((batch, hidden), dtype)
    return mask.reshape(batch, hidden).astype(dtype)


def forward(
    params: LSTMParams,
    xs: Array,
    state: LSTMState,
    valid: Array | None,
    mask: Array | None,
    reverse: bool,
    platform: str,
    save: bool = True,
) -> tuple[Array, LSTMState, Residuals | None]:
    """The forward kernel: ``(hs (T, *B, H), final state, residuals or None)``, time-major ``xs``."""
    num_steps = xs.shape[0]
    batch_shape = xs.shape[1:-1]
    batch = math.prod(batch_shape)
    h = params.hidden_size
    acc = state.cell.dtype
    output_map = params.w_o is not None
    zx = add_bias(matmul(xs.reshape(num_steps * batch, -1), params.w_x, acc), params.b.astype(acc))
    zx = zx.reshape(num_steps, batch, 4 * h)
    w_o = params.w_o if params.w_o is not None else jnp.zeros((h, h), params.dtype)
    b_o = (params.b_o if params.b_o is not None else jnp.zeros((h,), params.dtype)).reshape(1, h)
    outs = [
        jax.ShapeDtypeStruct((num_steps, batch, h), xs.dtype),  # hs
        jax.ShapeDtypeStruct((num_steps, batch, 4 * h) if save else (1, 1, 4 * h), acc),  # gates
        jax.ShapeDtypeStruct((num_steps, batch, h) if save else (1, 1, h), acc),  # cells
        jax.ShapeDtypeStruct((num_steps, batch, h) if save and output_map else (1, 1, h), acc),  # u
        jax.ShapeDtypeStruct((batch, h), acc),
        jax.ShapeDtypeStruct((batch, h), acc),
    ]
    kernel = functools.partial(
        _forward_kernel, num_steps=num_steps, hidden=h, reverse=reverse, output_map=output_map, save=save
    )
    args = [
        zx,
        _valid_rows(valid, num_steps, batch, acc),
        _mask_rows(mask, batch, h, acc),
        params.w_h,
        w_o,
        b_o,
        state.cell.reshape(batch, h),
        state.hidden.reshape(batch, h),
    ]
    kinds = ["t", "t", "b", "w", "w", "w", "b", "b"]
    out_kinds = ["t", "t" if save else "w", "t" if save else "w", "t" if save and output_map else "w", "b", "b"]
    hs, gates, cells, u, c_t, h_t = _call(kernel, "jaxlstm_forward", platform, batch, args, kinds, outs, out_kinds)
    hs = hs.reshape((num_steps,) + batch_shape + (h,))
    final = LSTMState(c_t.reshape(batch_shape + (h,)), h_t.reshape(batch_shape + (h,)))
    if not save:
        return hs, final, None
    t_shape = (num_steps,) + batch_shape
    res = Residuals(
        gates.reshape(t_shape + (4 * h,)),
        cells.reshape(t_shape + (h,)),
        u.reshape(t_shape + (h,)) if output_map else None,
    )
    return hs, final, res


def backward(
    params: LSTMParams,
    res: Residuals,
    first_cell: Array,
    dhs: Array,
    d_final: LSTMState,
    valid: Array | None,
    mask: Array | None,
    reverse: bool,
    platform: str,
) -> tuple[Array, Array | None, LSTMState]:
    """The backward kernel: ``(dG (T, *B, 4H), dZ (T, *B, H) or None, d_initial_state)``."""
    num_steps = res.cells.shape[0]
    batch_shape = res.cells.shape[1:-1]
    batch = math.prod(batch_shape)
    h = params.hidden_size
    acc = res.cells.dtype
    output_map = params.w_o is not None
    w_o_t = params.w_o.T if params.w_o is not None else jnp.zeros((h, h), params.dtype)
    u = _flat(res.u, batch) if res.u is not None else jnp.zeros((1, 1, h), acc)
    outs = [
        jax.ShapeDtypeStruct((num_steps, batch, 4 * h), acc),
        jax.ShapeDtypeStruct((num_steps, batch, h) if output_map else (1, 1, h), acc),
        jax.ShapeDtypeStruct((batch, h), acc),
        jax.ShapeDtypeStruct((batch, h), acc),
    ]
    kernel = functools.partial(_backward_kernel, num_steps=num_steps, hidden=h, reverse=reverse, output_map=output_map)
    args = [
        _flat(res.gates, batch),
        _flat(res.cells, batch),
        u,
        _flat(dhs, batch),
        _valid_rows(valid, num_steps, batch, acc),
        _mask_rows(mask, batch, h, acc),
        params.w_h.T,
        w_o_t,
        first_cell.reshape(batch, h),
        d_final.cell.reshape(batch, h),
        d_final.hidden.reshape(batch, h),
    ]
    kinds = ["t", "t", "t" if output_map else "w", "t", "t", "b", "w", "w", "b", "b", "b"]
    out_kinds = ["t", "t" if output_map else "w", "b", "b"]
    d_pre, dz, dc0, dh0 = _call(kernel, "jaxlstm_backward", platform, batch, args, kinds, outs, out_kinds)
    t_shape = (num_steps,) + batch_shape
    d_pre = d_pre.reshape(t_shape + (4 * h,))
    dz_out = dz.reshape(t_shape + (h,)) if output_map else None
    return d_pre, dz_out, LSTMState(dc0.reshape(batch_shape + (h,)), dh0.reshape(batch_shape + (h,)))


# ---------------------------------------------------------------- the layer


def _per_platform(args: tuple, kernels: Any, scan: Any, params: LSTMParams, xs: Array, interpret: bool) -> Any:
    """``kernels(platform, *args)`` on each platform whose kernels can take this call (Triton on
    ``cuda``/``rocm``, Mosaic on ``tpu``), ``scan(*args)`` elsewhere, chosen at lowering time
    (``jax.lax.platform_dependent``); ``interpret``: the interpreted kernels everywhere."""
    if interpret:
        return kernels("interpret", *args)
    branches = {
        name: functools.partial(kernels, platform)
        for name, platform in (("cuda", "gpu"), ("rocm", "gpu"), ("tpu", "tpu"))
        if not unsupported(params, xs, platform, checkpoint_every=None)
    }
    return jax.lax.platform_dependent(*args, default=scan, **branches)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def layer(params, xs, state, valid, mask, reverse, unroll, interpret):
    """``impl="pallas"``, one time-major layer: each platform the program is lowered for gets its own
    kernels, chosen at lowering time by ``jax.lax.platform_dependent``, so one exported program carries
    the right path for each; a platform without kernels (the CPU), or one whose kernels cannot take
    this call's sizes, runs the scan with the hand-written backward pass. The choice sits inside the
    forward and the backward pass of one ``custom_vjp`` (both paths keep the same residuals), so
    differentiation never transforms it. ``interpret``: the kernels through the Pallas interpreter,
    on any platform."""

    def kernels(platform: str, params: Any, xs: Any, state: Any, valid: Any, mask: Any) -> Any:
        hs, final, _ = forward(params, xs, state, valid, mask, reverse, platform, save=False)
        return hs, final

    def scan(params: Any, xs: Any, state: Any, valid: Any, mask: Any) -> Any:
        return plain_forward(params, xs, state, valid, mask, reverse, unroll)

    return _per_platform((params, xs, state, valid, mask), kernels, scan, params, xs, interpret)


def _layer_fwd(params, xs, state, valid, mask, reverse, unroll, interpret):
    def kernels(platform: str, params: Any, xs: Any, state: Any, valid: Any, mask: Any) -> Any:
        return forward(params, xs, state, valid, mask, reverse, platform)

    def scan(params: Any, xs: Any, state: Any, valid: Any, mask: Any) -> Any:
        return forward_with_residuals(params, xs, state, valid, mask, reverse, unroll)

    hs, final, res = _per_platform((params, xs, state, valid, mask), kernels, scan, params, xs, interpret)
    return (hs, final), (params, xs, state, valid, mask, hs, res)


def _layer_bwd(reverse, unroll, interpret, saved, cotangents):
    params, xs, state, valid, mask, hs, res = saved
    dhs, d_final = cotangents

    def reverse_pass(params: Any, res: Any, first: Any, dhs: Any, d_end: Any, valid: Any, mask: Any, rev: bool) -> Any:
        def kernels(platform: str, params: Any, res: Any, dhs: Any, d_end: Any, valid: Any, mask: Any) -> Any:
            d_pre, dz, d_start = backward(params, res, first, dhs, d_end, valid, mask, rev, platform)
            return d_pre, dz, d_start, None  # no projection: no dA

        def scan(params: Any, res: Any, dhs: Any, d_end: Any, valid: Any, mask: Any) -> Any:
            return backward_scan(params, res, first, dhs, d_end, valid, mask, rev)

        return _per_platform((params, res, dhs, d_end, valid, mask), kernels, scan, params, xs, interpret)

    grads, dxs, d_state = chunk_backward(
        params, xs, state, res, hs, dhs, d_final, valid, mask, reverse, unroll, reverse_pass=reverse_pass
    )
    return as_dtypes_of(grads, params), dxs, d_state, None, no_grad(mask)


layer.defvjp(_layer_fwd, _layer_bwd)
