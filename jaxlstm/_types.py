"""Parameters and state of one LSTM layer.

Notation used for shapes throughout the package:

* ``B`` batch size (any number of leading batch dimensions where stated)
* ``T`` number of time steps
* ``I`` input features
* ``H`` hidden features (the size of ``c``, and of ``a`` unless projected)
* ``P`` the size of ``a`` with a projection (LSTMP, ``proj_size``); ``P = H`` without

Layout. The four maps of ``[a^{t-1}, x^t]`` in the cell's equations
(``W_f1``, ``W_i``, ``W_f2``, ``W_f3``) are stored fused, in row-vector
orientation, as two matrices so that one step costs two matmuls::

    pre = a @ w_h + x @ w_x + b          # (..., 4H)
    pre = [pre_f1 | pre_i | pre_f2 | pre_f3]   # gate order along the last axis

``w_h`` is ``(H, 4H)``, ``w_x`` is ``(I, 4H)``, ``b`` is ``(4H,)``. The cell's
output map ``W_o c + b_o`` is stored as ``w_o = W_o.T`` ``(H, H)`` and ``b_o``
``(H,)``; both are ``None`` for the classic cell (``tanh(c)``).

With a projection (LSTMP, Sak et al., 2014; PyTorch's ``proj_size``) the
hidden state is ``a^t = γ_o W_hr`` of size ``P``, stored as ``w_hr`` ``(H, P)``,
and ``w_h`` is ``(P, 4H)``: it is ``a^t`` that is fed back.

Names of the gate blocks follow the equations: ``f1`` (forget), ``i`` (the tanh
candidate, ``tanh(W_i [a, x] + b_i)``), ``f2`` (the sigmoid that scales the
candidate, what other libraries call the input gate) and ``f3`` (the sigmoid
of the output gate). The candidate is ``i`` everywhere in this package.

This module is the leaf of the package: it imports jax only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

#: A JAX array (shapes are given in docstrings with the letters above).
Array = jax.Array
#: ``init(key, shape, dtype) -> array``, as ``jax.nn.initializers``.
Initializer = Callable[..., Array]
#: How gradients flow back through time: the hand-written backward pass, or autodiff through ``lax.scan``.
Bptt = Literal["custom", "autodiff"]

#: Names of the gate blocks of the fused weights, in storage order.
GATE_ORDER = ("f1", "i", "f2", "f3")


class LSTMParams(NamedTuple):
    """Weights of one LSTM layer (a pytree).

    Attributes:
      w_h: ``(H, 4H)`` recurrent weights, acting on ``a^{t-1}``; column blocks
        in the order ``f1, i, f2, f3`` (see :data:`GATE_ORDER`).
      w_x: ``(I, 4H)`` input weights, acting on ``x^t``; same block order.
      b: ``(4H,)`` biases ``[b_f1 | b_i | b_f2 | b_f3]``.
      w_o: ``(H, H)`` the output map, transposed (``W_o.T``), or
        ``None`` for the classic cell.
      b_o: ``(H,)`` the output map's bias, or ``None`` for the classic cell.
      w_hr: ``(H, P)`` the projection of ``γ_o`` to the hidden state (LSTMP),
        or ``None`` (no projection: ``a^t = γ_o``). With it, ``w_h`` is ``(P, 4H)``.

    Use :func:`init_params` or :func:`params_from_gates` to build one, and
    :meth:`gates` to read it back in the per-gate notation of the equations.

    Example:
      >>> import jax, jaxlstm
      >>> p = jaxlstm.init_params(jax.random.key(0), input_size=3, hidden_size=5)
      >>> p.w_h.shape, p.w_x.shape, p.b.shape, p.w_o.shape
      ((5, 20), (3, 20), (20,), (5, 5))
      >>> p.output_transform, p.input_size, p.hidden_size
      (True, 3, 5)
    """

    w_h: Array
    w_x: Array
    b: Array
    w_o: Array | None = None
    b_o: Array | None = None
    w_hr: Array | None = None

    @property
    def hidden_size(self) -> int:
        """``H``, the size of the cell state (and of the gates)."""
        return int(self.w_h.shape[-1]) // 4

    @property
    def output_size(self) -> int:
        """The size of the hidden state ``a`` (the outputs): ``P`` with a projection, else ``H``."""
        return int(self.w_h.shape[-2])

    @property
    def proj_size(self) -> int | None:
        """``P``, or ``None`` without a projection."""
        return None if self.w_hr is None else int(self.w_hr.shape[-1])

    @property
    def input_size(self) -> int:
        """``I``."""
        return int(self.w_x.shape[-2])

    @property
    def output_transform(self) -> bool:
        """``True`` for the output-map cell (``tanh(W_o c + b_o)``), ``False`` for the classic cell."""
        return self.w_o is not None

    @property
    def dtype(self) -> Any:
        """The weights' dtype."""
        return self.w_h.dtype

    def gates(self) -> dict[str, Array | None]:
        """The weights in the per-gate notation of the equations (the inverse of :func:`params_from_gates`).

        Returns:
          A dict with keys ``W_f1, b_f1, W_i, b_i, W_f2, b_f2, W_f3, b_f3`` (each
          ``W`` of shape ``(H, H + I)``, acting on ``[a^{t-1}, x^t]``, hidden part
          first; each ``b`` of shape ``(H,)``) and ``W_o`` ``(H, H)``, ``b_o``
          ``(H,)``, which are ``None`` for the classic cell; with a projection
          each ``W`` is ``(H, P + I)`` and ``W_hr`` ``(P, H)`` (``a = W_hr γ_o``),
          else ``W_hr`` is ``None``.

        Example:
          >>> import jax, jaxlstm
          >>> p = jaxlstm.init_params(jax.random.key(0), 3, 5)
          >>> g = p.gates()
          >>> g["W_f1"].shape, g["b_f1"].shape, g["W_o"].shape
          ((5, 8), (5,), (5, 5))
          >>> q = jaxlstm.params_from_gates(**g)
          >>> bool((q.w_h == p.w_h).all() and (q.w_x == p.w_x).all())
          True
        """
        h = self.hidden_size
        if self.w_h.ndim != 2 or self.w_h.shape[1] % 4:
            raise ValueError(f"LSTMParams.w_h must have shape (H, 4H) (or (P, 4H)); received shape {self.w_h.shape}.")
        out: dict[str, Array | None] = {}
        for k, name in enumerate(GATE_ORDER):
            cols = slice(k * h, (k + 1) * h)
            out[f"W_{name}"] = jnp.concatenate([self.w_h[:, cols].T, self.w_x[:, cols].T], axis=1)
            out[f"b_{name}"] = self.b[cols]
        out["W_o"] = None if self.w_o is None else self.w_o.T
        out["b_o"] = self.b_o
        out["W_hr"] = None if self.w_hr is None else self.w_hr.T
        return out


class LSTMState(NamedTuple):
    """The carry of the LSTM: ``(cell, hidden)``, in that order.

    Attributes:
      cell: ``(*B, H)`` the cell state ``c`` (long memory).
      hidden: ``(*B, H)`` the hidden state ``a`` (short memory, the output);
        ``(*B, P)`` with a projection.

    Note the order: ``cell`` first, like Flax's ``(c, h)`` carry. PyTorch and
    Keras order their states ``(h, c)``; :mod:`jaxlstm` always names them.
    """

    cell: Array
    hidden: Array


class BidirectionalParams(NamedTuple):
    """Weights of a bidirectional layer: two independent :class:`LSTMParams`."""

    forward: LSTMParams
    backward: LSTMParams


class BidirectionalState(NamedTuple):
    """State of a bidirectional layer: one :class:`LSTMState` per direction.

    ``backward`` is the state after the backward pass has consumed the *first*
    time step, i.e. the summary of the whole sequence read right to left.
    """

    forward: LSTMState
    backward: LSTMState


#: One layer of a stack: unidirectional or bidirectional.
Layer = LSTMParams | BidirectionalParams
#: The state of one layer of a stack.
LayerState = LSTMState | BidirectionalState


def static(*dims: Any) -> bool:
    """Whether every size is a known integer (not a symbolic dimension of ``jax.export``).

    A choice made by size (a layout, a threshold) takes the path that serves
    every size when a size is symbolic: such a program runs at any size.
    """
    return all(isinstance(d, int) for d in dims)


def _register_for_export() -> None:
    """Let ``jax.export`` serialise programs that take or return these types (each once per process)."""
    from jax import export

    for cls in (LSTMParams, LSTMState, BidirectionalParams, BidirectionalState):
        try:
            export.register_namedtuple_serialization(cls, serialized_name=f"jaxlstm.{cls.__name__}")
        except ValueError:  # already registered (a module reloaded)
            pass


_register_for_export()
