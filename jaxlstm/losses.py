"""Losses for sequence models: masked by lengths or a mask, averaged over the valid steps.

Needs only jax and optax (no ``train`` extra); :mod:`jaxlstm.training`
re-exports these names.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["masked_mse", "sequence_cross_entropy", "sequence_mask", "to_bits"]


def sequence_mask(seq_lengths: Any, num_steps: int) -> jax.Array:
    """``(B, T)`` boolean mask, true at ``t < seq_lengths[b]``."""
    return jnp.arange(num_steps)[None, :] < jnp.asarray(seq_lengths)[:, None]


def _weights(shape_bt: tuple, seq_lengths: Any, mask: Any, dtype: Any) -> jax.Array:
    if seq_lengths is not None and mask is not None:
        raise ValueError("give either seq_lengths or mask, not both.")
    if seq_lengths is not None:
        mask = sequence_mask(seq_lengths, shape_bt[1])
    if mask is None:
        return jnp.ones(shape_bt, dtype)
    mask = jnp.asarray(mask)
    if mask.shape != tuple(shape_bt):
        raise ValueError(f"mask must have shape {tuple(shape_bt)} (B, T); received {mask.shape}.")
    return mask.astype(dtype)


def sequence_cross_entropy(logits: Any, targets: Any, *, seq_lengths: Any = None, mask: Any = None) -> jax.Array:
    """Mean next-token cross-entropy in nats over the valid steps.

    Args:
      logits: ``(B, T, V)``.
      targets: ``(B, T)`` integer classes.
      seq_lengths: optional ``(B,)``: steps ``t >= L`` are ignored.
      mask: optional ``(B, T)`` weights (alternative to ``seq_lengths``).

    Returns:
      The sum of per-step losses over valid steps divided by their number (a scalar).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlstm.losses import sequence_cross_entropy, to_bits
      >>> logits = jnp.zeros((2, 3, 4))              # uniform over 4 classes
      >>> loss = sequence_cross_entropy(logits, jnp.zeros((2, 3), jnp.int32), seq_lengths=jnp.array([3, 1]))
      >>> round(float(to_bits(loss)), 6)             # log2(4) bits
      2.0
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 3 or jnp.shape(targets) != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and targets (B, T); received {logits.shape} and {jnp.shape(targets)}."
        )
    per_step = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    w = _weights(per_step.shape, seq_lengths, mask, per_step.dtype)
    return jnp.sum(per_step * w) / jnp.maximum(jnp.sum(w), 1.0)


def masked_mse(predictions: Any, targets: Any, *, seq_lengths: Any = None, mask: Any = None) -> jax.Array:
    """Mean squared error over the valid steps of ``(B, T, ...)`` arrays.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlstm.losses import masked_mse
      >>> float(masked_mse(jnp.ones((2, 3)), jnp.zeros((2, 3)), seq_lengths=jnp.array([3, 0])))
      1.0
    """
    predictions, targets = jnp.asarray(predictions), jnp.asarray(targets)
    if predictions.shape != targets.shape or predictions.ndim < 2:
        raise ValueError(
            f"predictions and targets must share a (B, T, ...) shape; received {predictions.shape} and {targets.shape}."
        )
    err = (predictions - targets) ** 2
    err = err.reshape(err.shape[:2] + (-1,)).mean(-1)
    w = _weights(err.shape, seq_lengths, mask, err.dtype)
    return jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1.0)


def to_bits(nats: Any) -> Any:
    """Nats to bits (divide by ``ln 2``)."""
    return nats / math.log(2.0)
