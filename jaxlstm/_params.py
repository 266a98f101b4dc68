"""Parameters and state of one LSTM layer.

Notation used for shapes throughout the package:

* ``B`` batch size (any number of leading batch dimensions where stated)
* ``T`` number of time steps
* ``I`` input features
* ``H`` hidden features (the size of both ``c`` and ``a``)

Layout. The four maps of ``[a^{t-1}, x^t]`` in the seed's equations
(``W_f1``, ``W_i``, ``W_f2``, ``W_f3``) are stored fused, in row-vector
orientation, as two matrices so that one step costs two matmuls::

    pre = a @ w_h + x @ w_x + b          # (..., 4H)
    pre = [pre_f1 | pre_i | pre_f2 | pre_f3]   # gate order along the last axis

``w_h`` is ``(H, 4H)``, ``w_x`` is ``(I, 4H)``, ``b`` is ``(4H,)``. The seed's
output map ``W_o c + b_o`` is stored as ``w_o = W_o.T`` ``(H, H)`` and ``b_o``
``(H,)``; both are ``None`` for the classic cell (``tanh(c)``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import _errors

Array = jax.Array
Initializer = Callable[..., Array]

#: Names of the gate blocks of the fused weights, in storage order.
GATE_ORDER = ("f1", "i", "f2", "f3")


class LSTMParams(NamedTuple):
    """Weights of one LSTM layer (a pytree).

    Attributes:
      w_h: ``(H, 4H)`` recurrent weights, acting on ``a^{t-1}``; column blocks
        in the order ``f1, i, f2, f3`` (see :data:`GATE_ORDER`).
      w_x: ``(I, 4H)`` input weights, acting on ``x^t``; same block order.
      b: ``(4H,)`` biases ``[b_f1 | b_i | b_f2 | b_f3]``.
      w_o: ``(H, H)`` the seed's output map, transposed (``W_o.T``), or
        ``None`` for the classic cell.
      b_o: ``(H,)`` the seed's output bias, or ``None`` for the classic cell.

    Use :func:`init_params` or :func:`params_from_gates` to build one, and
    :meth:`gates` to read it back in the seed's notation.

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
    w_o: Optional[Array] = None
    b_o: Optional[Array] = None

    @property
    def hidden_size(self) -> int:
        """``H``."""
        return int(self.w_h.shape[-2])

    @property
    def input_size(self) -> int:
        """``I``."""
        return int(self.w_x.shape[-2])

    @property
    def output_transform(self) -> bool:
        """``True`` for the seed cell (``tanh(W_o c + b_o)``), ``False`` for the classic cell."""
        return self.w_o is not None

    @property
    def dtype(self):
        return self.w_h.dtype

    def gates(self) -> dict:
        """The weights in the seed's notation (the inverse of :func:`params_from_gates`).

        Returns:
          A dict with keys ``W_f1, b_f1, W_i, b_i, W_f2, b_f2, W_f3, b_f3`` (each
          ``W`` of shape ``(H, H + I)``, acting on ``[a^{t-1}, x^t]``, hidden part
          first; each ``b`` of shape ``(H,)``) and ``W_o`` ``(H, H)``, ``b_o``
          ``(H,)``, which are ``None`` for the classic cell.

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
        check_params(self)
        h = self.hidden_size
        out = {}
        for k, name in enumerate(GATE_ORDER):
            cols = slice(k * h, (k + 1) * h)
            out[f"W_{name}"] = jnp.concatenate([self.w_h[:, cols].T, self.w_x[:, cols].T], axis=1)
            out[f"b_{name}"] = self.b[cols]
        out["W_o"] = None if self.w_o is None else self.w_o.T
        out["b_o"] = self.b_o
        return out


class LSTMState(NamedTuple):
    """The carry of the LSTM: ``(cell, hidden)``, in that order.

    Attributes:
      cell: ``(*B, H)`` the cell state ``c`` (long memory).
      hidden: ``(*B, H)`` the hidden state ``a`` (short memory, the output).

    Note the order: ``cell`` first, like Flax's ``(c, h)`` carry. PyTorch and
    Keras order their states ``(h, c)``; :mod:`jaxlstm` always names them.
    """

    cell: Array
    hidden: Array


def zero_state(params_or_hidden_size: Any, batch_shape: tuple[int, ...] = (), dtype=None) -> LSTMState:
    """The all-zero state for a batch shape.

    Args:
      params_or_hidden_size: an :class:`LSTMParams` (its ``H`` and dtype are
        used) or an int ``H``.
      batch_shape: leading batch dimensions, ``()`` for one unbatched sequence.
      dtype: defaults to the params' dtype, or float32 when given an int.

    Returns:
      An :class:`LSTMState` whose fields have shape ``(*batch_shape, H)``.

    Example:
      >>> import jaxlstm
      >>> s = jaxlstm.zero_state(4, batch_shape=(2,))
      >>> s.cell.shape, s.hidden.shape
      ((2, 4), (2, 4))
    """
    if isinstance(params_or_hidden_size, LSTMParams):
        h = params_or_hidden_size.hidden_size
        dtype = params_or_hidden_size.dtype if dtype is None else dtype
    else:
        h = _positive_int(params_or_hidden_size, "hidden_size")
        dtype = jnp.float32 if dtype is None else dtype
    if isinstance(batch_shape, int):
        batch_shape = (batch_shape,)
    shape = tuple(batch_shape) + (h,)
    z = jnp.zeros(shape, dtype)
    return LSTMState(z, z)


def _positive_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int; received {value!r} of type {type(value).__name__}.")
    if value <= 0:
        raise ValueError(
            f"{name} must be a positive int; received {value}. "
            f"An LSTM layer needs at least one {name.replace('_size', '')} feature."
        )
    return int(value)


def default_recurrent_init() -> Initializer:
    """Orthogonal, applied to each gate's ``(H, H)`` block separately."""
    ortho = jax.nn.initializers.orthogonal()

    def init(key, shape, dtype=jnp.float32):
        h, four_h = shape
        keys = jax.random.split(key, four_h // h)
        return jnp.concatenate([ortho(k, (h, h), dtype) for k in keys], axis=1)

    return init


def _identity_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.eye(shape[0], shape[1], dtype=dtype)


def layer_initializers(
    *,
    kernel_init: Optional[Initializer] = None,
    recurrent_init: Optional[Initializer] = None,
    bias_init: Optional[Initializer] = None,
    forget_bias: float = 1.0,
    output_init: Optional[Initializer] = None,
    output_bias_init: Optional[Initializer] = None,
) -> dict[str, Initializer]:
    """One initializer per field of :class:`LSTMParams` (``None`` picks the default).

    The single source of the defaults documented in :func:`init_params`; the
    Flax modules use it too. Each returned function has the signature
    ``init(key, shape, dtype)``.
    """
    base_bias = bias_init or jax.nn.initializers.zeros

    def b_init(key, shape, dtype=jnp.float32):
        b = base_bias(key, shape, dtype)
        return b.at[: shape[0] // 4].add(jnp.asarray(forget_bias, dtype))

    inits = {
        "w_h": recurrent_init or default_recurrent_init(),
        "w_x": kernel_init or jax.nn.initializers.glorot_uniform(),
        "b": b_init,
        "w_o": output_init or _identity_init,
        "b_o": output_bias_init or jax.nn.initializers.zeros,
    }
    return {name: _in_float32_at_least(init) for name, init in inits.items()}


def _in_float32_at_least(init: Initializer) -> Initializer:
    """Run ``init`` in float32 for a half-precision dtype, then cast.

    Some initializers cannot run in half precision (the orthogonal one needs a
    QR decomposition, which LAPACK has only for float32 and wider), and
    float32 draws rounded once are the better half-precision weights anyway.
    """

    def init_fn(key, shape, dtype=jnp.float32):
        dtype = jnp.dtype(dtype)
        if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
            return init(key, shape, jnp.float32).astype(dtype)
        return init(key, shape, dtype)

    return init_fn


def param_shapes(input_size: int, hidden_size: int, output_transform: bool) -> dict[str, tuple[int, ...]]:
    """Shapes of the fields of :class:`LSTMParams` (only the present ones)."""
    input_size = _positive_int(input_size, "input_size")
    h = _positive_int(hidden_size, "hidden_size")
    shapes = {"w_h": (h, 4 * h), "w_x": (input_size, 4 * h), "b": (4 * h,)}
    if output_transform:
        shapes.update(w_o=(h, h), b_o=(h,))
    return shapes


def init_params(
    key: Array,
    input_size: int,
    hidden_size: int,
    *,
    output_transform: bool = True,
    dtype=jnp.float32,
    kernel_init: Optional[Initializer] = None,
    recurrent_init: Optional[Initializer] = None,
    bias_init: Optional[Initializer] = None,
    forget_bias: float = 1.0,
    output_init: Optional[Initializer] = None,
    output_bias_init: Optional[Initializer] = None,
) -> LSTMParams:
    """Random parameters for one LSTM layer.

    Defaults (each replaceable by any ``jax.nn.initializers``-style function
    ``init(key, shape, dtype)``):

    * ``kernel_init``: Glorot-uniform over the fused ``(I, 4H)`` input weights.
    * ``recurrent_init``: orthogonal, one ``(H, H)`` block per gate.
    * ``bias_init``: zeros; then ``forget_bias`` (default 1.0) is added to
      ``b_f1``, so the cell starts out remembering (Jozefowicz et al., 2015).
    * ``output_init``: the identity for ``W_o`` and ``output_bias_init``: zeros
      for ``b_o``. The seed cell thus starts out *exactly* as the classic cell
      (``tanh(W_o c + b_o) = tanh(c)``) and learns its output map from there;
      a random ``W_o`` would scramble the cell state's coordinates before the
      first step of training.

    Args:
      key: a PRNG key.
      input_size: ``I > 0``.
      hidden_size: ``H > 0``.
      output_transform: ``True`` for the seed cell, ``False`` for the classic cell.
      dtype: parameter dtype.

    Returns:
      :class:`LSTMParams`.

    Example:
      >>> import jax, jaxlstm
      >>> p = jaxlstm.init_params(jax.random.key(0), 8, 16, output_transform=False)
      >>> p.output_transform, p.b[:16].tolist() == [1.0] * 16
      (False, True)
    """
    input_size = _positive_int(input_size, "input_size")
    hidden_size = _positive_int(hidden_size, "hidden_size")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype; received {jnp.dtype(dtype)}. Use e.g. jnp.float32.")
    inits = layer_initializers(
        kernel_init=kernel_init,
        recurrent_init=recurrent_init,
        bias_init=bias_init,
        forget_bias=forget_bias,
        output_init=output_init,
        output_bias_init=output_bias_init,
    )
    shapes = param_shapes(input_size, hidden_size, output_transform)
    keys = dict(zip(("w_x", "w_h", "b", "w_o", "b_o"), jax.random.split(key, 5)))
    return LSTMParams(**{name: inits[name](keys[name], shape, dtype) for name, shape in shapes.items()})


def params_from_gates(W_f1, b_f1, W_i, b_i, W_f2, b_f2, W_f3, b_f3, W_o=None, b_o=None) -> LSTMParams:
    """Build :class:`LSTMParams` from per-gate matrices in the seed's notation.

    Args:
      W_f1, W_i, W_f2, W_f3: ``(H, H + I)`` each, acting on the concatenation
        ``[a^{t-1}, x^t]`` (hidden part first).
      b_f1, b_i, b_f2, b_f3: ``(H,)`` each.
      W_o: ``(H, H)``, acting on the new cell state ``c^t``; ``None`` (together
        with ``b_o``) gives the classic cell.
      b_o: ``(H,)`` or ``None``.

    Returns:
      :class:`LSTMParams` computing exactly::

        γ_f1 = σ(W_f1 [a, x] + b_f1)
        γ_i  = tanh(W_i [a, x] + b_i) · σ(W_f2 [a, x] + b_f2)
        c'   = γ_f1 · c + γ_i
        a'   = tanh(W_o c' + b_o) · σ(W_f3 [a, x] + b_f3)     (tanh(c') if classic)

    Example:
      >>> import jax.numpy as jnp, jaxlstm
      >>> H, I = 2, 3
      >>> W = jnp.zeros((H, H + I)); b = jnp.zeros(H)
      >>> p = jaxlstm.params_from_gates(W, b, W, b, W, b, W, b)
      >>> p.w_h.shape, p.w_x.shape, p.output_transform
      ((2, 8), (3, 8), False)
    """
    mats = {"W_f1": W_f1, "W_i": W_i, "W_f2": W_f2, "W_f3": W_f3}
    biases = {"b_f1": b_f1, "b_i": b_i, "b_f2": b_f2, "b_f3": b_f3}
    if (W_o is None) != (b_o is None):
        given, missing = ("W_o", "b_o") if W_o is not None else ("b_o", "W_o")
        raise ValueError(
            f"params_from_gates: {given} was given but {missing} was not. Pass both W_o and b_o "
            "for the seed cell, or neither for the classic cell."
        )
    mats = {k: jnp.asarray(v) for k, v in mats.items()}
    biases = {k: jnp.asarray(v) for k, v in biases.items()}
    ref = mats["W_f1"]
    if ref.ndim != 2:
        raise ValueError(f"params_from_gates: W_f1 must have shape (H, H + I); received shape {ref.shape}.")
    h = ref.shape[0]
    if ref.shape[1] <= h:
        raise ValueError(
            f"params_from_gates: W_f1 has shape {ref.shape}, so H = {h} and H + I = {ref.shape[1]} "
            "leaves no input features. Each W must be (H, H + I) acting on [a, x], hidden part first."
        )
    for name, m in mats.items():
        if m.shape != ref.shape:
            raise ValueError(
                f"params_from_gates: {name} has shape {m.shape} but W_f1 has shape {ref.shape}; "
                "all four [a, x] maps must be (H, H + I)."
            )
    for name, v in biases.items():
        if v.shape != (h,):
            raise ValueError(f"params_from_gates: {name} has shape {v.shape}; expected ({h},) to match W_f1 {ref.shape}.")
    arrays = list(mats.values()) + list(biases.values())
    if W_o is not None:
        W_o, b_o = jnp.asarray(W_o), jnp.asarray(b_o)
        if W_o.shape != (h, h):
            raise ValueError(f"params_from_gates: W_o has shape {W_o.shape}; expected ({h}, {h}) (it maps c^t to c^t).")
        if b_o.shape != (h,):
            raise ValueError(f"params_from_gates: b_o has shape {b_o.shape}; expected ({h},).")
        arrays += [W_o, b_o]
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) != 1:
        raise TypeError(
            f"params_from_gates: all weights must share one dtype; received {sorted(map(str, dtypes))}. "
            "Cast them first, e.g. W.astype(jnp.float32)."
        )
    _errors.check_floating(ref.dtype, "params_from_gates weights")
    order = [mats[f"W_{n}"] for n in GATE_ORDER]
    w_h = jnp.concatenate([m[:, :h].T for m in order], axis=1)
    w_x = jnp.concatenate([m[:, h:].T for m in order], axis=1)
    b = jnp.concatenate([biases[f"b_{n}"] for n in GATE_ORDER])
    return LSTMParams(w_h, w_x, b, None if W_o is None else W_o.T, b_o)


def check_params(params) -> LSTMParams:
    """Validate the internal consistency of an :class:`LSTMParams` (static shapes only)."""
    if not isinstance(params, LSTMParams):
        raise TypeError(
            f"expected jaxlstm.LSTMParams; received {_errors.describe(params)}. "
            "Build one with jaxlstm.init_params or jaxlstm.params_from_gates."
        )
    w_h, w_x, b = params.w_h, params.w_x, params.b
    if getattr(w_h, "ndim", None) != 2 or w_h.shape[1] != 4 * w_h.shape[0]:
        raise ValueError(f"LSTMParams.w_h must have shape (H, 4H); received {_errors.describe(w_h)}.")
    h = w_h.shape[0]
    if getattr(w_x, "ndim", None) != 2 or w_x.shape[1] != 4 * h:
        raise ValueError(f"LSTMParams.w_x must have shape (I, {4 * h}) to match w_h {w_h.shape}; received {_errors.describe(w_x)}.")
    if getattr(b, "shape", None) != (4 * h,):
        raise ValueError(f"LSTMParams.b must have shape ({4 * h},); received {_errors.describe(b)}.")
    if (params.w_o is None) != (params.b_o is None):
        raise ValueError("LSTMParams: w_o and b_o must both be set (seed cell) or both be None (classic cell).")
    if params.w_o is not None:
        if params.w_o.shape != (h, h) or params.b_o.shape != (h,):
            raise ValueError(
                f"LSTMParams: w_o must be ({h}, {h}) and b_o ({h},); received {params.w_o.shape} and {params.b_o.shape}."
            )
    dtypes = {a.dtype for a in params if a is not None}
    if len(dtypes) != 1:
        raise TypeError(
            f"LSTMParams: all weights must share one dtype; received {sorted(map(str, dtypes))}. "
            "Cast them with jax.tree.map(lambda a: a.astype(jnp.float32), params)."
        )
    _errors.check_floating(w_h.dtype, "LSTMParams weights")
    return params
