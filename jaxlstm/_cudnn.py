"""The cuDNN path: one classic LSTM layer through cuDNN's persistent kernels (``jax.experimental.rnn``).

cuDNN's layout is PyTorch's, flattened: ``W_ih`` ``(4H, I)`` and ``W_hh``
``(4H, H)`` with the gate blocks in the order ``i f g o`` (jaxlstm's ``f2 f1 i
f3``), then the biases ``b_ih`` and ``b_hh``. :func:`pack` builds that vector
from :class:`LSTMParams` with differentiable array operations, so gradients
reach jaxlstm's own parameters. :func:`reference` runs the same packed weights
through ``jax.experimental.rnn.lstm_ref`` (the plain-JAX rendering of the
cuDNN call): it runs on any platform, which is how the packing is proven
without a GPU.

cuDNN computes the classic cell only; the layer must be batched, run
forwards, without a projection, a step mask or recurrent dropout. Sequences
of length zero are a known problem of the cuDNN call (jax issues 17966 and
18867), so ``impl="auto"`` takes this path only without ``seq_lengths``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ._types import Array, LSTMParams, LSTMState

#: jaxlstm's gate blocks in cuDNN's (PyTorch's) order ``i f g o``.
CUDNN_ORDER = ("f2", "f1", "i", "f3")
_INDEX = {"f1": 0, "i": 1, "f2": 2, "f3": 3}


def _reorder(w: Array, h: int) -> Array:
    """Columns ``[f1 | i | f2 | f3]`` -> ``[f2 | f1 | i | f3]`` (the last axis)."""
    return jnp.concatenate([w[..., _INDEX[g] * h : (_INDEX[g] + 1) * h] for g in CUDNN_ORDER], axis=-1)


def pack(params: LSTMParams) -> Array:
    """The flat cuDNN weight vector of one unidirectional classic layer."""
    h = params.hidden_size
    w_ih = _reorder(params.w_x, h).T  # (4H, I)
    w_hh = _reorder(params.w_h, h).T  # (4H, H)
    b_ih = _reorder(params.b, h)
    return jnp.concatenate([w_ih.ravel(), w_hh.ravel(), b_ih, jnp.zeros_like(b_ih)])


def unsupported(params: LSTMParams, xs: Array, *, reverse: bool, step_mask: Any, recurrent_mask: Any) -> list[str]:
    """Why this layer call cannot run on cuDNN (empty: it can)."""
    reasons = []
    if params.w_o is not None:
        reasons.append("cuDNN computes the classic cell only (output_transform=False)")
    if params.w_hr is not None:
        reasons.append("no projection (proj_size)")
    if xs.ndim != 3:
        reasons.append("a batch of sequences (xs of rank 3)")
    if reverse:
        reasons.append("forward direction only (reverse=False)")
    if step_mask is not None:
        reasons.append("no step mask (use seq_lengths for right padding)")
    if recurrent_mask is not None:
        reasons.append("no recurrent dropout")
    if jnp.dtype(params.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.float64)):
        reasons.append(f"float32, float16 or float64 weights (received {jnp.dtype(params.dtype).name})")
    return reasons


def available() -> bool:
    """Whether this process can trace the cuDNN call: a CUDA GPU backend with jaxlib's RNN kernels."""
    if jax.default_backend() != "gpu":
        return False
    try:
        from jaxlib import gpu_rnn
    except ImportError:  # pragma: no cover - depends on the installation
        return False
    return hasattr(gpu_rnn, "compute_rnn_workspace_reserve_space_sizes")


def _call(fn: Any, params: LSTMParams, xs: Array, state: LSTMState, lengths: Array | None) -> tuple[Array, LSTMState]:
    """``xs`` ``(B, T, I)`` batch-major -> ``(hs (B, T, H), final state)``."""
    batch, steps, size = xs.shape
    h = params.hidden_size
    if lengths is None:
        lengths = jnp.full((batch,), steps, jnp.int32)
    ys, h_n, c_n = fn(xs, state.hidden[None], state.cell[None], lengths.astype(jnp.int32), size, h)
    return ys, LSTMState(c_n[0], h_n[0])


def lstm(params: LSTMParams, xs: Array, state: LSTMState, lengths: Array | None) -> tuple[Array, LSTMState]:
    """One classic layer on cuDNN (GPU only); ``xs`` ``(B, T, I)``."""
    from jax.experimental import rnn

    weights = pack(params)

    def run(x: Array, h0: Array, c0: Array, lens: Array, size: int, hidden: int) -> tuple[Array, Array, Array]:
        return rnn.lstm(x, h0, c0, weights, lens, size, hidden, 1, 0.0, False)

    return _call(run, params, xs, state, lengths)


def reference(params: LSTMParams, xs: Array, state: LSTMState, lengths: Array | None) -> tuple[Array, LSTMState]:
    """The same packed weights through ``jax.experimental.rnn.lstm_ref``: runs anywhere, proves :func:`pack`."""
    from jax.experimental import rnn

    weights = pack(params)

    def run(x: Array, h0: Array, c0: Array, lens: Array, size: int, hidden: int) -> tuple[Array, Array, Array]:
        w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(weights, size, hidden, 1, False)
        return rnn.lstm_ref(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lens, size, hidden, 1, 0.0, False)

    return _call(run, params, xs, state, lengths)
