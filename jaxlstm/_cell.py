r"""The seed's gates as pure functions, and one fused cell step.

.. math::

   \gamma_{f1} &= \sigma(W_{f1} [a^{t-1}, x^t] + b_{f1}) \\
   \gamma_i    &= \tanh(W_i [a^{t-1}, x^t] + b_i) \cdot \sigma(W_{f2} [a^{t-1}, x^t] + b_{f2}) \\
   c^t         &= \gamma_{f1} \cdot c^{t-1} + \gamma_i \\
   \gamma_o    &= \tanh(W_o c^t + b_o) \cdot \sigma(W_{f3} [a^{t-1}, x^t] + b_{f3}) \\
   a^t         &= \gamma_o

The classic cell replaces ``tanh(W_o c^t + b_o)`` by ``tanh(c^t)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from . import _errors
from ._params import GATE_ORDER, LSTMParams, LSTMState, check_params

Array = jax.Array


def _check_inputs(params: LSTMParams, hidden_prev, x, cell=None):
    check_params(params)
    h = params.hidden_size
    hidden_prev, x = jnp.asarray(hidden_prev), jnp.asarray(x)
    _errors.check_floating(x.dtype, "x")
    _errors.check_same_dtype(x.dtype, params.dtype, "x")
    _errors.check_features(x, params.input_size, "x")
    batch = x.shape[:-1]
    arrays = [("hidden_prev", hidden_prev)] + ([("cell", jnp.asarray(cell))] if cell is not None else [])
    for name, arr in arrays:
        if arr.shape != batch + (h,):
            raise ValueError(
                f"{name} has shape {arr.shape}; expected {batch + (h,)} (x's batch shape {batch} and "
                f"hidden_size {h}). Nothing is broadcast: give every array the same leading batch dimensions."
            )
        _errors.check_same_dtype(arr.dtype, params.dtype, name)
    return hidden_prev, x


def _add_bias(y: Array, b: Array) -> Array:
    """``y + b`` with ``b`` expanded to ``y``'s rank explicitly (no implicit rank promotion)."""
    return y + b.reshape((1,) * (y.ndim - 1) + b.shape)


def _pre_activation(params: LSTMParams, hidden_prev, x, gate: str) -> Array:
    """``W_gate [a, x] + b_gate`` for one gate, computed on the gate's block only."""
    h = params.hidden_size
    k = GATE_ORDER.index(gate)
    cols = slice(k * h, (k + 1) * h)
    return _add_bias(hidden_prev @ params.w_h[:, cols] + x @ params.w_x[:, cols], params.b[cols])


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
    return _cell_output(params, cell) * jax.nn.sigmoid(_pre_activation(params, hidden_prev, x, "f3"))


def _cell_output(params: LSTMParams, cell: Array) -> Array:
    """``tanh(c @ w_o + b_o)`` (seed cell) or ``tanh(c)`` (classic cell)."""
    if params.w_o is None:
        return jnp.tanh(cell)
    return jnp.tanh(_add_bias(cell @ params.w_o, params.b_o))


#: Above this many ``[a, x]`` entries per step (``B * (H + I)``) the per-step concatenation
#: costs more than the second matmul launch it saves (measured with benchmarks/speed.py).
STACKED_MAX_ELEMENTS = 65536


def stacked_weight(params: LSTMParams, xs: Array):
    """``[w_h; w_x]`` ``(H + I, 4H)`` for one matmul of ``[a, x]`` per step, or ``None``.

    Built once outside the loop. One larger matmul per step beats two small
    ones at small and medium sizes (fewer kernels per step); for large
    ``B * (H + I)`` the per-step concatenation costs more, and two matmuls are used.
    """
    batch = math.prod(xs.shape[1:-1])
    if batch * (params.hidden_size + params.input_size) > STACKED_MAX_ELEMENTS:
        return None
    return jnp.concatenate([params.w_h, params.w_x], axis=0)


def _pre(params: LSTMParams, hidden_in: Array, x: Array, w_stacked=None) -> Array:
    """``[a, x] @ [w_h; w_x] + b``, ``(..., 4H)``."""
    if w_stacked is None:
        y = hidden_in @ params.w_h + x @ params.w_x
    else:
        y = jnp.concatenate([hidden_in, x], axis=-1) @ w_stacked
    return _add_bias(y, params.b)


def _update(params: LSTMParams, cell_prev: Array, pre: Array):
    """Gate activations and the new state from the pre-activations.

    Returns ``(cell, hidden, gates, u)``: ``gates`` are ``[f1 | g | f2 | f3]``
    after their nonlinearities and ``u`` is ``tanh(c @ w_o + b_o)`` (or ``tanh(c)``).
    """
    h = params.hidden_size
    f1 = jax.nn.sigmoid(pre[..., :h])
    g = jnp.tanh(pre[..., h : 2 * h])
    f2 = jax.nn.sigmoid(pre[..., 2 * h : 3 * h])
    f3 = jax.nn.sigmoid(pre[..., 3 * h :])
    cell = f1 * cell_prev + g * f2
    u = _cell_output(params, cell)
    return cell, u * f3, (f1, g, f2, f3), u


def _step(
    params: LSTMParams, state: LSTMState, x: Array, recurrent_mask=None, w_stacked=None
) -> tuple[LSTMState, Array]:
    """The unchecked fused step used inside scans; ``recurrent_mask`` multiplies ``a^{t-1}`` in the gates."""
    hidden_in = state.hidden if recurrent_mask is None else state.hidden * recurrent_mask
    cell, hidden, _, _ = _update(params, state.cell, _pre(params, hidden_in, x, w_stacked))
    return LSTMState(cell, hidden), hidden


def lstm_step(params: LSTMParams, state: LSTMState, x: Array) -> tuple[LSTMState, Array]:
    """One time step of the LSTM, with fused matmuls.

    Numerically ``c' = forget_gate(a, x) * c + input_gate(a, x)`` and
    ``a' = output_gate(c', a, x)``, computed as two matmuls
    (``a @ w_h + x @ w_x``) for all four ``[a, x]`` maps at once.

    Args:
      params: :class:`LSTMParams`.
      state: :class:`LSTMState` ``(cell, hidden)``, each ``(*B, H)``.
      x: ``(*B, I)``.

    Returns:
      ``(new_state, hidden)`` where ``hidden`` is ``new_state.hidden``, ``(*B, H)``.
      This is the ``(carry, y)`` contract of ``jax.lax.scan``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlstm
      >>> p = jaxlstm.init_params(jax.random.key(0), 3, 4)
      >>> state = jaxlstm.zero_state(p, batch_shape=(2,))
      >>> state, y = jaxlstm.lstm_step(p, state, jnp.ones((2, 3)))
      >>> y.shape, state.cell.shape
      ((2, 4), (2, 4))
    """
    x = jnp.asarray(x)
    check_params(params)
    _errors.check_floating(x.dtype, "x")
    _errors.check_features(x, params.input_size, "x")
    _errors.check_same_dtype(x.dtype, params.dtype, "x")
    state = _errors.check_state(state, x.shape[:-1], params.hidden_size, params.dtype)
    return _step(params, state, x)
