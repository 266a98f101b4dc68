r"""The three gates as separate, checked functions, for teaching and inspection.

.. math::

   \gamma_{f1} &= \sigma(W_{f1} [a^{t-1}, x^t] + b_{f1}) \\
   \gamma_i    &= \tanh(W_i [a^{t-1}, x^t] + b_i) \cdot \sigma(W_{f2} [a^{t-1}, x^t] + b_{f2}) \\
   \gamma_o    &= \tanh(W_o c^t + b_o) \cdot \sigma(W_{f3} [a^{t-1}, x^t] + b_{f3})

Each computes only its own gate's block of the fused weights. The scan uses
the fused step of :mod:`jaxlstm._cell` instead (the same numbers).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ._cell import add_bias, cell_output
from ._checks import check_features, check_floating, check_params, check_same_dtype
from ._types import GATE_ORDER, Array, LSTMParams


def _check_inputs(params: LSTMParams, hidden_prev: Any, x: Any, cell: Any = None) -> tuple[Array, Array]:
    check_params(params)
    h = params.hidden_size
    hidden_prev, x = jnp.asarray(hidden_prev), jnp.asarray(x)
    check_floating(x.dtype, "x")
    check_same_dtype(x.dtype, params.dtype, "x")
    check_features(x, params.input_size, "x")
    batch = x.shape[:-1]
    arrays = [("hidden_prev", hidden_prev)] + ([("cell", jnp.asarray(cell))] if cell is not None else [])
    for name, arr in arrays:
        if arr.shape != batch + (h,):
            raise ValueError(
                f"{name} has shape {arr.shape}; expected {batch + (h,)} (x's batch shape {batch} and "
                f"hidden_size {h}). Nothing is broadcast: give every array the same leading batch dimensions."
            )
        check_same_dtype(arr.dtype, params.dtype, name)
    return hidden_prev, x


def _pre_activation(params: LSTMParams, hidden_prev: Array, x: Array, gate: str) -> Array:
    """``W_gate [a, x] + b_gate`` for one gate, computed on the gate's block only."""
    h = params.hidden_size
    k = GATE_ORDER.index(gate)
    cols = slice(k * h, (k + 1) * h)
    return add_bias(hidden_prev @ params.w_h[:, cols] + x @ params.w_x[:, cols], params.b[cols])


def forget_gate(params: LSTMParams, hidden_prev: Array, x: Array) -> Array:
    r"""The forget gate :math:`\gamma_{f1} = \sigma(W_{f1} [a^{t-1}, x^t] + b_{f1})`.

    Args:
      params: :class:`LSTMParams`.
      hidden_prev: ``(*B, H)`` the previous hidden state ``a^{t-1}``.
      x: ``(*B, I)`` the current input ``x^t``.

    Returns:
      ``(*B, H)``, values in ``(0, 1)``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlstm
      >>> p = jaxlstm.init_params(jax.random.key(0), 3, 4)
      >>> gamma = jaxlstm.forget_gate(p, jnp.zeros(4), jnp.zeros(3))
      >>> [round(float(v), 3) for v in gamma]   # sigmoid(forget bias 1)
      [0.731, 0.731, 0.731, 0.731]
    """
    hidden_prev, x = _check_inputs(params, hidden_prev, x)
    return jax.nn.sigmoid(_pre_activation(params, hidden_prev, x, "f1"))


def input_gate(params: LSTMParams, hidden_prev: Array, x: Array) -> Array:
    r"""The input gate :math:`\gamma_i = \tanh(W_i [a^{t-1}, x^t] + b_i) \cdot \sigma(W_{f2} [a^{t-1}, x^t] + b_{f2})`.

    The new information added to the cell state.

    Args:
      params: :class:`LSTMParams`.
      hidden_prev: ``(*B, H)`` the previous hidden state ``a^{t-1}``.
      x: ``(*B, I)`` the current input ``x^t``.

    Returns:
      ``(*B, H)``, values in ``(-1, 1)``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlstm
      >>> p = jaxlstm.init_params(jax.random.key(0), 3, 4)
      >>> jaxlstm.input_gate(p, jnp.zeros((2, 4)), jnp.zeros((2, 3))).shape
      (2, 4)
    """
    hidden_prev, x = _check_inputs(params, hidden_prev, x)
    candidate = jnp.tanh(_pre_activation(params, hidden_prev, x, "i"))
    return candidate * jax.nn.sigmoid(_pre_activation(params, hidden_prev, x, "f2"))


def output_gate(params: LSTMParams, cell: Array, hidden_prev: Array, x: Array) -> Array:
    r"""The output gate :math:`\gamma_o = \tanh(W_o c^t + b_o) \cdot \sigma(W_{f3} [a^{t-1}, x^t] + b_{f3})`.

    For the classic cell (``params.w_o is None``) the first factor is ``tanh(c^t)``.
    The result is the new hidden state ``a^t``.

    Args:
      params: :class:`LSTMParams`.
      cell: ``(*B, H)`` the *new* cell state ``c^t``.
      hidden_prev: ``(*B, H)`` the previous hidden state ``a^{t-1}``.
      x: ``(*B, I)`` the current input ``x^t``.

    Returns:
      ``(*B, H)``, values in ``(-1, 1)``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlstm
      >>> p = jaxlstm.init_params(jax.random.key(0), 3, 4)
      >>> jaxlstm.output_gate(p, jnp.ones(4), jnp.zeros(4), jnp.zeros(3)).shape
      (4,)
    """
    hidden_prev, x = _check_inputs(params, hidden_prev, x, cell)
    cell = jnp.asarray(cell)
    return cell_output(params, cell) * jax.nn.sigmoid(_pre_activation(params, hidden_prev, x, "f3"))
