"""The forward scan with the features leading: states ``(H, B)``, one column per sequence.

Same maths as :func:`jaxlstm._scan.plain_forward`, arranged the other way
round: each step computes ``W^T [a; x]`` ``(4H, B)`` from the transposed
weights ``W^T`` ``(4H, H + I)``, made once outside the loop. A gate is then a
block of whole rows (contiguous memory) rather than a strided block of
columns, and the matmul's long side is ``4H`` rather than ``B``. On the CPU
this pays at large hidden sizes and batches: :data:`MIN_HIDDEN` and
:data:`MIN_BATCH` say where it is used, measured with ``benchmarks/layout.py``;
other platforms never use it.

Only the forward pass without residuals runs here (inference, and the
primal of the hand-written gradient's layers); the training forward keeps the
``(B, H)`` layout that the backward pass reads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._cell import gate_activations, hold, masked
from ._precision import HALF
from ._types import Array, LSTMParams, LSTMState, static

#: Per platform: the feature-major scan is used from this hidden size up (``None``: never).
MIN_HIDDEN: dict[str, int | None] = {"cpu": 256}
#: ... and from this batch size up (one batch dimension only).
MIN_BATCH = 16
#: Batch sizes ``lo <= B < hi`` at which each step runs two matmuls (``W_h^T a + W_x^T x``); elsewhere
#: one of ``[a; x]``. Measured (``benchmarks/layout.py``): two are ~20% faster at (32, 256, 128, 512), mixed
#: at B = 16, 64 and 128, slower at B = 4 and 8.
TWO_MATMULS_BATCHES = (32, 64)


def applies(params: LSTMParams, xs: Array) -> bool:
    """Whether :func:`forward` serves this call: time-major ``xs`` ``(T, B, I)`` with ``B >= MIN_BATCH``,
    ``H >= MIN_HIDDEN`` on this platform, no projection, float32 or float64."""
    threshold = MIN_HIDDEN.get(jax.default_backend())
    return (
        threshold is not None
        and xs.ndim == 3
        and static(xs.shape[1])  # a symbolic batch: the row-major scan, which serves every size
        and xs.shape[1] >= MIN_BATCH
        and params.hidden_size >= threshold
        and params.w_hr is None
        and jnp.dtype(params.dtype) not in HALF
    )


def uses_two_matmuls(batch: int) -> bool:
    """Whether each step of :func:`forward` runs two matmuls at this batch size (:data:`TWO_MATMULS_BATCHES`)."""
    lo, hi = TWO_MATMULS_BATCHES
    return lo <= batch < hi


def forward(
    params: LSTMParams,
    xs: Array,
    state: LSTMState,
    valid: Array | None,
    mask: Array | None,
    reverse: bool,
    unroll: int | bool,
) -> tuple[Array, LSTMState]:
    """``(hiddens (T, B, H), final state)`` as :func:`jaxlstm._scan.plain_forward`, computed feature-major.

    ``valid`` ``(T, B)`` or ``None``; ``mask`` (recurrent dropout) ``(B, H)`` or ``None``.
    """
    h = params.hidden_size
    two = uses_two_matmuls(xs.shape[1])
    w_h_t, w_x_t = params.w_h.T, params.w_x.T
    w_t = None if two else jnp.concatenate([params.w_h, params.w_x], axis=0).T
    b = params.b[:, None]
    output_map = None if params.w_o is None or params.b_o is None else (params.w_o.T, params.b_o[:, None])
    mask_t = None if mask is None else mask.T

    def body(s: LSTMState, inputs: tuple[Array, Array | None]) -> tuple[LSTMState, Array]:
        x, v = inputs  # x: (I, B); v: (B,) or None
        a_in = masked(s.hidden, mask_t)
        if w_t is None:
            pre = w_h_t @ a_in + w_x_t @ x + b
        else:
            pre = w_t @ jnp.concatenate([a_in, x], axis=0) + b
        f1, i, f2, f3 = gate_activations(pre, h, axis=0)
        c = f1 * s.cell + i * f2
        u = jnp.tanh(c) if output_map is None else jnp.tanh(output_map[0] @ c + output_map[1])
        return hold(None if v is None else v[None, :], LSTMState(c, u * f3), s)

    xs_t = jnp.swapaxes(xs, 1, 2)  # (T, I, B)
    start = LSTMState(state.cell.T, state.hidden.T)
    final, hs = jax.lax.scan(body, start, (xs_t, valid), reverse=reverse, unroll=unroll)
    return jnp.swapaxes(hs, 1, 2), LSTMState(final.cell.T, final.hidden.T)
