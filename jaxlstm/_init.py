"""Building parameters and states: :func:`init_params`, :func:`params_from_gates`, :func:`zero_state`.

The default initializers are defined once here (:func:`layer_initializers`)
and used by the functional API and the Flax modules alike.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ._checks import check_floating, positive_int
from ._precision import state_dtype
from ._types import GATE_ORDER, Array, Initializer, LSTMParams, LSTMState


def zero_state(params_or_hidden_size: Any, batch_shape: int | tuple[int, ...] = (), dtype: Any = None) -> LSTMState:
    """The all-zero state for a batch shape.

    Args:
      params_or_hidden_size: an :class:`LSTMParams` (its ``H`` and dtype are
        used) or an int ``H``.
      batch_shape: leading batch dimensions, ``()`` for one unbatched sequence.
      dtype: defaults to the dtype of the params' state (theirs, or float32
        for bfloat16 and float16 params: see the mixed-precision policy in
        the README), or float32 when given an int.

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
        p = params_or_hidden_size.output_size
        dtype = state_dtype(params_or_hidden_size.dtype) if dtype is None else dtype
    else:
        h = p = positive_int(params_or_hidden_size, "hidden_size")
        dtype = jnp.float32 if dtype is None else dtype
    if isinstance(batch_shape, int):
        batch_shape = (batch_shape,)
    batch_shape = tuple(batch_shape)
    return LSTMState(jnp.zeros(batch_shape + (h,), dtype), jnp.zeros(batch_shape + (p,), dtype))


def default_recurrent_init() -> Initializer:
    """Orthogonal, applied to each gate's ``(H, H)`` block (``(P, H)`` with a projection) separately."""
    ortho = jax.nn.initializers.orthogonal()

    def init(key: Array, shape: tuple, dtype: Any = jnp.float32) -> Array:
        rows, four_h = shape
        keys = jax.random.split(key, 4)
        return jnp.concatenate([ortho(k, (rows, four_h // 4), dtype) for k in keys], axis=1)

    return init


def _identity_init(key: Array, shape: tuple, dtype: Any = jnp.float32) -> Array:
    del key
    return jnp.eye(shape[0], shape[1], dtype=dtype)


def layer_initializers(
    *,
    kernel_init: Initializer | None = None,
    recurrent_init: Initializer | None = None,
    bias_init: Initializer | None = None,
    forget_bias: float = 1.0,
    output_init: Initializer | None = None,
    output_bias_init: Initializer | None = None,
    projection_init: Initializer | None = None,
) -> dict[str, Initializer]:
    """One initializer per field of :class:`LSTMParams` (``None`` picks the default).

    The single source of the defaults documented in :func:`init_params`; the
    Flax modules use it too. Each returned function has the signature
    ``init(key, shape, dtype)``.
    """
    base_bias = bias_init or jax.nn.initializers.zeros

    def b_init(key: Array, shape: tuple, dtype: Any = jnp.float32) -> Array:
        b = base_bias(key, shape, dtype)
        return b.at[: shape[0] // 4].add(jnp.asarray(forget_bias, dtype))

    inits = {
        "w_h": recurrent_init or default_recurrent_init(),
        "w_x": kernel_init or jax.nn.initializers.glorot_uniform(),
        "b": b_init,
        "w_o": output_init or _identity_init,
        "b_o": output_bias_init or jax.nn.initializers.zeros,
        "w_hr": projection_init or jax.nn.initializers.glorot_uniform(),
    }
    return {name: _in_float32_at_least(init) for name, init in inits.items()}


def _in_float32_at_least(init: Initializer) -> Initializer:
    """Run ``init`` in float32 for a half-precision dtype, then cast.

    Some initializers cannot run in half precision (the orthogonal one needs a
    QR decomposition, which LAPACK has only for float32 and wider), and
    float32 draws rounded once are the better half-precision weights anyway.
    """

    def init_fn(key: Array, shape: tuple, dtype: Any = jnp.float32) -> Array:
        dtype = jnp.dtype(dtype)
        if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
            return init(key, shape, jnp.float32).astype(dtype)
        return init(key, shape, dtype)

    return init_fn


def param_shapes(
    input_size: int, hidden_size: int, output_transform: bool, proj_size: int | None = None
) -> dict[str, tuple[int, ...]]:
    """Shapes of the fields of :class:`LSTMParams` (only the present ones)."""
    input_size = positive_int(input_size, "input_size")
    h = positive_int(hidden_size, "hidden_size")
    p = h if proj_size is None else positive_int(proj_size, "proj_size")
    shapes = {"w_h": (p, 4 * h), "w_x": (input_size, 4 * h), "b": (4 * h,)}
    if output_transform:
        shapes.update(w_o=(h, h), b_o=(h,))
    if proj_size is not None:
        shapes.update(w_hr=(h, p))
    return shapes


def init_params(
    key: Array,
    input_size: int,
    hidden_size: int,
    *,
    output_transform: bool = True,
    dtype: Any = jnp.float32,
    kernel_init: Initializer | None = None,
    recurrent_init: Initializer | None = None,
    bias_init: Initializer | None = None,
    forget_bias: float = 1.0,
    output_init: Initializer | None = None,
    output_bias_init: Initializer | None = None,
    proj_size: int | None = None,
    projection_init: Initializer | None = None,
) -> LSTMParams:
    """Random parameters for one LSTM layer.

    Defaults (each replaceable by any ``jax.nn.initializers``-style function
    ``init(key, shape, dtype)``):

    * ``kernel_init``: Glorot-uniform over the fused ``(I, 4H)`` input weights.
    * ``recurrent_init``: orthogonal, one ``(H, H)`` block per gate.
    * ``bias_init``: zeros; then ``forget_bias`` (default 1.0) is added to
      ``b_f1``, so the cell starts out remembering (Jozefowicz et al., 2015).
    * ``output_init``: the identity for ``W_o`` and ``output_bias_init``: zeros
      for ``b_o``. The output-map cell thus starts out *exactly* as the classic cell
      (``tanh(W_o c + b_o) = tanh(c)``) and learns its output map from there;
      a random ``W_o`` would scramble the cell state's coordinates before the
      first step of training.
    * ``projection_init`` (with ``proj_size``): Glorot-uniform for ``w_hr``.

    Args:
      key: a PRNG key.
      input_size: ``I > 0``.
      hidden_size: ``H > 0``.
      output_transform: ``True`` for the output-map cell (``tanh(W_o c + b_o)`` in the
        output gate), ``False`` for the classic cell (``tanh(c)``).
      dtype: parameter dtype.
      proj_size: ``P``: project the hidden state to ``a^t = γ_o W_hr`` of size
        ``P`` (LSTMP, as PyTorch's ``proj_size``); ``None`` (default): no projection.

    Returns:
      :class:`LSTMParams`.

    Example:
      >>> import jax, jaxlstm
      >>> p = jaxlstm.init_params(jax.random.key(0), 8, 16, output_transform=False)
      >>> p.output_transform, p.b[:16].tolist() == [1.0] * 16
      (False, True)
    """
    input_size = positive_int(input_size, "input_size")
    hidden_size = positive_int(hidden_size, "hidden_size")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype; received {jnp.dtype(dtype)}. Use e.g. jnp.float32.")
    inits = layer_initializers(
        kernel_init=kernel_init,
        recurrent_init=recurrent_init,
        bias_init=bias_init,
        forget_bias=forget_bias,
        output_init=output_init,
        output_bias_init=output_bias_init,
        projection_init=projection_init,
    )
    shapes = param_shapes(input_size, hidden_size, output_transform, proj_size)
    keys = dict(zip(("w_x", "w_h", "b", "w_o", "b_o"), jax.random.split(key, 5)))
    keys["w_hr"] = jax.random.fold_in(key, 6)  # its own key: the other weights do not depend on proj_size
    return LSTMParams(**{name: inits[name](keys[name], shape, dtype) for name, shape in shapes.items()})


def params_from_gates(
    W_f1: Any,
    b_f1: Any,
    W_i: Any,
    b_i: Any,
    W_f2: Any,
    b_f2: Any,
    W_f3: Any,
    b_f3: Any,
    W_o: Any = None,
    b_o: Any = None,
    W_hr: Any = None,
) -> LSTMParams:
    """Build :class:`LSTMParams` from per-gate matrices in the per-gate notation of the equations.

    Args:
      W_f1, W_i, W_f2, W_f3: ``(H, H + I)`` each, acting on the concatenation
        ``[a^{t-1}, x^t]`` (hidden part first).
      b_f1, b_i, b_f2, b_f3: ``(H,)`` each.
      W_o: ``(H, H)``, acting on the new cell state ``c^t``; ``None`` (together
        with ``b_o``) gives the classic cell.
      b_o: ``(H,)`` or ``None``.
      W_hr: ``(P, H)``, the projection ``a' = W_hr γ_o`` (LSTMP), or ``None``.
        With it the ``[a, x]`` maps are ``(H, P + I)``.

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
            "for the cell with a learned output map, or neither for the classic cell."
        )
    mats = {k: jnp.asarray(v) for k, v in mats.items()}
    biases = {k: jnp.asarray(v) for k, v in biases.items()}
    ref = mats["W_f1"]
    if ref.ndim != 2:
        raise ValueError(f"params_from_gates: W_f1 must have shape (H, H + I); received shape {ref.shape}.")
    h = ref.shape[0]
    p = h
    if W_hr is not None:
        W_hr = jnp.asarray(W_hr)
        if W_hr.ndim != 2 or W_hr.shape[1] != h:
            raise ValueError(f"params_from_gates: W_hr has shape {W_hr.shape}; expected (P, {h}) (it maps γ_o to a).")
        p = W_hr.shape[0]
    if ref.shape[1] <= p:
        raise ValueError(
            f"params_from_gates: W_f1 has shape {ref.shape}, so the hidden state takes {p} columns and "
            f"{ref.shape[1]} leaves no input features. Each W must be (H, H + I) (or (H, P + I) with W_hr) "
            "acting on [a, x], hidden part first."
        )
    for name, m in mats.items():
        if m.shape != ref.shape:
            raise ValueError(
                f"params_from_gates: {name} has shape {m.shape} but W_f1 has shape {ref.shape}; "
                "all four [a, x] maps must be (H, H + I)."
            )
    for name, v in biases.items():
        if v.shape != (h,):
            raise ValueError(
                f"params_from_gates: {name} has shape {v.shape}; expected ({h},) to match W_f1 {ref.shape}."
            )
    arrays = list(mats.values()) + list(biases.values())
    if W_o is not None:
        W_o, b_o = jnp.asarray(W_o), jnp.asarray(b_o)
        if W_o.shape != (h, h):
            raise ValueError(f"params_from_gates: W_o has shape {W_o.shape}; expected ({h}, {h}) (it maps c^t to c^t).")
        if b_o.shape != (h,):
            raise ValueError(f"params_from_gates: b_o has shape {b_o.shape}; expected ({h},).")
        arrays += [W_o, b_o]
    if W_hr is not None:
        arrays.append(W_hr)
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) != 1:
        raise TypeError(
            f"params_from_gates: all weights must share one dtype; received {sorted(map(str, dtypes))}. "
            "Cast them first, e.g. W.astype(jnp.float32)."
        )
    check_floating(ref.dtype, "params_from_gates weights")
    order = [mats[f"W_{n}"] for n in GATE_ORDER]
    w_h = jnp.concatenate([m[:, :p].T for m in order], axis=1)
    w_x = jnp.concatenate([m[:, p:].T for m in order], axis=1)
    b = jnp.concatenate([biases[f"b_{n}"] for n in GATE_ORDER])
    return LSTMParams(w_h, w_x, b, None if W_o is None else W_o.T, b_o, None if W_hr is None else W_hr.T)
