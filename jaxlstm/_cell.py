r"""The gates as pure functions, and one fused cell step.

.. math::

   \gamma_{f1} &= \sigma(W_{f1} [a^{t-1}, x^t] + b_{f1}) \\
   \gamma_i    &= \tanh(W_i [a^{t-1}, x^t] + b_i) \cdot \sigma(W_{f2} [a^{t-1}, x^t] + b_{f2}) \\
   c^t         &= \gamma_{f1} \cdot c^{t-1} + \gamma_i \\
   \gamma_o    &= \tanh(W_o c^t + b_o) \cdot \sigma(W_{f3} [a^{t-1}, x^t] + b_{f3}) \\
   a^t         &= \gamma_o

The classic cell replaces ``tanh(W_o c^t + b_o)`` by ``tanh(c^t)``.

Here: the fused cell step (:func:`lstm_step`, checked) and its unchecked
pieces, which the scans of :mod:`jaxlstm._scan` and :mod:`jaxlstm._bptt` run
at every time step. ``u = tanh(W_o c + b_o)`` (``tanh(c)`` for the classic
cell) names the first factor of the output gate.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ._checks import check_features, check_floating, check_params, check_same_dtype, check_state
from ._precision import matmul, state_dtype
from ._types import Array, LSTMParams, LSTMState


def add_bias(y: Array, b: Array) -> Array:
    """``y + b`` with ``b`` expanded to ``y``'s rank explicitly (no implicit rank promotion)."""
    return y + b.reshape((1,) * (y.ndim - 1) + b.shape)


def cell_output(params: LSTMParams, cell: Array) -> Array:
    """``tanh(c @ w_o + b_o)`` (output-map cell) or ``tanh(c)`` (classic cell), in ``cell``'s dtype."""
    if params.w_o is None or params.b_o is None:
        return jnp.tanh(cell)
    return jnp.tanh(add_bias(matmul(cell, params.w_o, cell.dtype), params.b_o.astype(cell.dtype)))


def pre_activations(params: LSTMParams, hidden_in: Array, x: Array, w_stacked: Array | None = None) -> Array:
    """``[a, x] @ [w_h; w_x] + b``, ``(..., 4H)``, accumulated in ``hidden_in``'s (the state's) dtype."""
    acc = hidden_in.dtype
    if w_stacked is None:
        y = matmul(hidden_in, params.w_h, acc) + matmul(x, params.w_x, acc)
    else:
        y = matmul(jnp.concatenate([hidden_in.astype(x.dtype), x], axis=-1), w_stacked, acc)
    return add_bias(y, params.b.astype(acc))


def gate_activations(pre: Array, h: int, axis: int = -1) -> tuple[Array, Array, Array, Array]:
    """``(σ(f1), tanh(i), σ(f2), σ(f3))`` of the pre-activations' four blocks of ``h`` along ``axis``."""

    def block(k: int) -> Array:
        return jax.lax.slice_in_dim(pre, k * h, (k + 1) * h, axis=axis)

    f1 = jax.nn.sigmoid(block(0))
    i = jnp.tanh(block(1))
    f2 = jax.nn.sigmoid(block(2))
    return f1, i, f2, jax.nn.sigmoid(block(3))


def update(
    params: LSTMParams, cell_prev: Array, pre: Array
) -> tuple[Array, Array, tuple[Array, Array, Array, Array], Array]:
    """Gate activations and the new state from the pre-activations.

    Returns ``(cell, hidden, gates, u)``: ``gates`` are ``[f1 | i | f2 | f3]``
    after their nonlinearities and ``u`` is ``tanh(c @ w_o + b_o)`` (or ``tanh(c)``).
    """
    f1, i, f2, f3 = gate_activations(pre, params.hidden_size)
    cell = f1 * cell_prev + i * f2
    u = cell_output(params, cell)
    hidden = u * f3
    if params.w_hr is not None:  # LSTMP: a = γ_o W_hr
        hidden = matmul(hidden, params.w_hr, hidden.dtype)
    return cell, hidden, (f1, i, f2, f3), u


def step(
    params: LSTMParams,
    state: LSTMState,
    x: Array,
    recurrent_mask: Array | None = None,
    w_stacked: Array | None = None,
) -> tuple[LSTMState, Array]:
    """The unchecked fused step used inside scans; ``recurrent_mask`` multiplies ``a^{t-1}`` in the gates.

    Returns the new state (in the state's dtype) and the output (in ``x``'s dtype).
    """
    hidden_in = state.hidden if recurrent_mask is None else state.hidden * recurrent_mask.astype(state.hidden.dtype)
    cell, hidden, _, _ = update(params, state.cell, pre_activations(params, hidden_in, x, w_stacked))
    return LSTMState(cell, hidden), hidden.astype(x.dtype)


def valid_at(valid_t: Array | None) -> Array | None:
    """One step's ``valid`` ``(*B,)`` as ``(*B, 1)``, to select whole states."""
    return None if valid_t is None else valid_t[..., None]


def hold(valid: Array | None, new: LSTMState, old: LSTMState) -> tuple[LSTMState, Array]:
    """At an invalid step keep the old state and output zeros.

    ``valid`` broadcasts against a state: ``(*B, 1)`` (:func:`valid_at`), or ``(1, B)`` for states ``(H, B)``.
    """
    if valid is None:
        return new, new.hidden
    held = LSTMState(jnp.where(valid, new.cell, old.cell), jnp.where(valid, new.hidden, old.hidden))
    return held, jnp.where(valid, new.hidden, jnp.zeros_like(new.hidden))


def masked(hidden: Array, mask: Array | None) -> Array:
    """``hidden * mask`` (the recurrent dropout mask), or ``hidden``."""
    return hidden if mask is None else hidden * mask.astype(hidden.dtype)


def lstm_step(params: LSTMParams, state: LSTMState, x: Any) -> tuple[LSTMState, Array]:
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
    check_floating(x.dtype, "x")
    check_features(x, params.input_size, "x")
    check_same_dtype(x.dtype, params.dtype, "x")
    state = check_state(
        state, x.shape[:-1], params.hidden_size, state_dtype(params.dtype), params.dtype, params.output_size
    )
    return step(params, state, x)
