"""The mixed-precision policy, in one place.

A layer computes in its parameters' dtype (the *compute* dtype). With a
half-precision compute dtype (bfloat16 or float16):

* the matmuls take half-precision operands and accumulate in float32
  (``preferred_element_type``);
* the gate arithmetic, the cell state ``c`` and the hidden state ``a``
  carried from step to step stay in float32, so rounding does not compound
  over time; the state a layer takes and returns is float32;
* the outputs ``a^t`` are rounded to the compute dtype once, when written;
* the backward pass runs in float32 too; gradients are rounded to the
  dtype of what they are the gradient of at the end (weight gradients after
  summing over all time steps and chunks).

With float32 or float64 everything stays in that dtype, as before: the
policy changes nothing there.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from ._types import Array

HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def state_dtype(compute_dtype: Any) -> Any:
    """The dtype of the state (and of every accumulation) for a compute dtype: float32 for half precision."""
    dtype = jnp.dtype(compute_dtype)
    return jnp.dtype(jnp.float32) if dtype in HALF else dtype


def matmul(a: Array, w: Array, acc: Any) -> Array:
    """``a @ w`` with ``a`` rounded to ``w``'s dtype and the products summed in ``acc``."""
    return jnp.matmul(a.astype(w.dtype), w, preferred_element_type=acc)
