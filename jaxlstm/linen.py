"""Flax linen modules: :class:`LSTMCell` (Flax's cell protocol) and :class:`LSTM` (a full layer stack).

Both are thin: they declare parameters with the names of
:class:`jaxlstm.LSTMParams` (``w_h, w_x, b, w_o, b_o``) and call the
functional core, so there is one implementation of the maths.

Parameter tree of :class:`LSTM`: ``{"layer_0": {...}, "layer_1": {...}}``,
or for a bidirectional stack ``{"layer_0_forward": {...},
"layer_0_backward": {...}, ...}``, each layer one parameter entry
holding ``w_h, w_x, b`` (and ``w_o, b_o``); :meth:`LSTM.layers` turns it into
the functional API's layers and :meth:`LSTM.set_layers` writes them back.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import _flax_common as common
from ._init import init_params, layer_initializers, param_shapes
from ._types import BidirectionalParams, Initializer, LSTMParams, LSTMState


def _declare(module: nn.Module, input_size: int) -> LSTMParams:
    inits = layer_initializers(
        kernel_init=module.kernel_init,
        recurrent_init=module.recurrent_init,
        bias_init=module.bias_init,
        forget_bias=module.forget_bias,
        output_init=module.output_init,
        output_bias_init=module.output_bias_init,
    )
    shapes = param_shapes(input_size, module.hidden_size, module.output_transform, module.proj_size)
    return LSTMParams(**{n: module.param(n, inits[n], shape, module.param_dtype) for n, shape in shapes.items()})


__all__ = ["LSTMCell", "LSTM", "SequenceClassifier", "CharLM"]


class LSTMCell(nn.RNNCellBase):
    """One LSTM step as a linen cell: ``__call__(carry, x) -> (carry, y)``.

    Works with ``flax.linen.RNN`` and ``flax.linen.Bidirectional``. The carry
    is a :class:`jaxlstm.LSTMState` ``(cell, hidden)``, each ``(*B, H)``. A plain ``(c, h)``
    tuple is accepted and returned as a tuple; the carry keeps the dtype it
    was given (``param_dtype`` from ``initialize_carry``) whatever the
    compute ``dtype``.

    The Flax drivers scan this cell with plain autodiff. For speed, run whole
    sequences with :class:`LSTM` instead: it uses the hand-written backward
    pass of :func:`jaxlstm.lstm`.

    Args:
      hidden_size: ``H``.
      output_transform: ``True`` for the output-map cell (``tanh(W_o c + b_o)`` in the
        output gate), ``False`` for the classic one (``tanh(c)``).
      dtype: compute dtype (``None``: promote input and params).
      param_dtype: parameter dtype.
      kernel_init, recurrent_init, bias_init, forget_bias, output_init, output_bias_init: see
        :func:`jaxlstm.init_params`.
      proj_size: ``P``: project the hidden state (LSTMP); its carry is then
        ``(c (*B, H), a (*B, P))``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxlstm.linen import LSTMCell
      >>> rnn = nn.RNN(LSTMCell(hidden_size=4))
      >>> xs = jnp.ones((2, 7, 3))
      >>> variables = rnn.init(jax.random.key(0), xs)
      >>> rnn.apply(variables, xs).shape
      (2, 7, 4)
    """

    hidden_size: int
    output_transform: bool = True
    dtype: Any | None = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer | None = None
    recurrent_init: Initializer | None = None
    bias_init: Initializer | None = None
    forget_bias: float = 1.0
    output_init: Initializer | None = None
    output_bias_init: Initializer | None = None
    proj_size: int | None = None

    @nn.compact
    def __call__(self, carry: LSTMState, x: jax.Array) -> tuple[LSTMState, jax.Array]:
        return common.cell_step(_declare(self, x.shape[-1]), carry, x, self.dtype, self.param_dtype)

    @nn.nowrap
    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
        """Zeros ``(c, h)``: the cell ``input_shape[:-1] + (H,)``, the hidden state ``(.., P)`` with a
        projection (``rng`` is unused).

        A plain tuple, as Flax's own cells give, so a subclass that unpacks
        the carry and calls this cell with ``(c, h)`` scans in ``nn.RNN``.
        """
        del rng
        c, h = common.zero_carry(input_shape[:-1], self.hidden_size, self.proj_size, self.param_dtype)
        return c, h

    @property
    def num_feature_axes(self) -> int:
        return 1

    @staticmethod
    def to_params(cell_params: dict) -> LSTMParams:
        """This cell's parameter dict -> :class:`jaxlstm.LSTMParams`."""
        return LSTMParams(**{k: cell_params[k] for k in LSTMParams._fields if k in cell_params})

    @staticmethod
    def from_params(params: LSTMParams) -> dict:
        """:class:`jaxlstm.LSTMParams` -> this cell's parameter dict."""
        return {k: v for k, v in params._asdict().items() if v is not None}


class LSTM(nn.Module):
    """A stack of (optionally bidirectional) LSTM layers, as a linen module.

    Args:
      hidden_size: ``H`` of every layer.
      num_layers: number of stacked layers.
      bidirectional: run each layer both ways and merge.
      merge: ``"concat"`` (default), ``"sum"``, ``"mean"``, ``"mul"``, a
        function ``(forward, backward) -> merged``, or ``None`` for the pair
        ``(forward_outputs, backward_outputs)`` (see :func:`jaxlstm.bidirectional`;
        a merge that does not give one array needs ``num_layers=1``).
      output_transform: ``True`` (default) for the output-map cell, ``False`` for
        the classic cell.
      dropout_rate: dropout on each layer's output except the last's.
      recurrent_dropout_rate: variational dropout on ``a^{t-1}`` inside the
        gates, one mask per sequence (same at every step).
      deterministic: default for the call's ``deterministic`` (dropout off
        when ``True``); as with ``flax.linen.Dropout`` it must be given here or
        at call time when a dropout rate is set. Dropout draws from the
        ``"dropout"`` rng collection.
      dtype, param_dtype: compute and parameter dtypes.
      kernel_init, recurrent_init, bias_init, forget_bias, output_init, output_bias_init: see
        :func:`jaxlstm.init_params`.
      unroll, reverse, time_major, bptt, checkpoint_every: see
        :func:`jaxlstm.lstm`; ``reverse`` and ``time_major`` can be overridden
        per call. ``backward`` is the deprecated name of ``bptt``.
      learn_initial_state: add trainable initial states, parameters
        ``initial_cell`` and ``initial_hidden`` of shape
        ``(num_layers, directions, H)`` (zeros at init), used for every
        sequence of the batch when the call gives no ``initial_state``.
      impl: ``"auto"``, ``"scan"``, ``"cudnn"``, ``"pallas"`` or ``"pallas_interpret"`` (see :func:`jaxlstm.lstm`).
      proj_size: ``P``: every layer projects its hidden state to ``P``
        features (LSTMP, as PyTorch's ``proj_size``); outputs have ``P``
        features (``2P`` concatenated when bidirectional).

    Call: ``model.apply(variables, xs, initial_state=None, *, seq_lengths=None, mask=None,
    deterministic=None, return_state=False)``. ``xs`` is ``(B, T, I)`` (or
    ``(T, B, I)`` time-major, or ``(T, I)``). Returns the last layer's outputs,
    or ``(outputs, final_states)`` with ``return_state=True`` where
    ``final_states`` holds one :class:`jaxlstm.LSTMState` (or
    :class:`jaxlstm.BidirectionalState`) per layer; ``initial_state`` has the
    same structure.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlstm.linen import LSTM
      >>> model = LSTM(hidden_size=8, num_layers=2, bidirectional=True)
      >>> xs = jnp.ones((4, 10, 3))
      >>> variables = model.init(jax.random.key(0), xs)
      >>> ys, states = model.apply(variables, xs, seq_lengths=jnp.array([10, 9, 5, 1]), return_state=True)
      >>> ys.shape, states[-1].backward.hidden.shape
      ((4, 10, 16), (4, 8))
    """

    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    merge: str | Callable[[jax.Array, jax.Array], Any] | None = "concat"
    output_transform: bool = True
    dropout_rate: float = 0.0
    recurrent_dropout_rate: float = 0.0
    deterministic: bool | None = None
    dtype: Any | None = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer | None = None
    recurrent_init: Initializer | None = None
    bias_init: Initializer | None = None
    forget_bias: float = 1.0
    output_init: Initializer | None = None
    output_bias_init: Initializer | None = None
    unroll: int = 1
    reverse: bool = False
    time_major: bool = False
    bptt: str | None = None
    checkpoint_every: int | None = None
    backward: str | None = None
    learn_initial_state: bool = False
    proj_size: int | None = None
    impl: str = "auto"

    def _declare_layer(self, name: str, input_size: int) -> LSTMParams:
        """One direction of one layer as a single parameter entry (initialised by :func:`jaxlstm.init_params`)."""

        def init(key: jax.Array) -> dict:
            params = init_params(
                key,
                input_size,
                self.hidden_size,
                output_transform=self.output_transform,
                dtype=self.param_dtype,
                kernel_init=self.kernel_init,
                recurrent_init=self.recurrent_init,
                bias_init=self.bias_init,
                forget_bias=self.forget_bias,
                output_init=self.output_init,
                output_bias_init=self.output_bias_init,
                proj_size=self.proj_size,
            )
            return LSTMCell.from_params(params)

        return LSTMCell.to_params(self.param(name, init))

    @nn.compact
    def __call__(
        self,
        xs: jax.Array,
        initial_state=None,
        *,
        seq_lengths: jax.Array | None = None,
        mask: jax.Array | None = None,
        deterministic: bool | None = None,
        return_state: bool = False,
        reverse: bool | None = None,
        time_major: bool | None = None,
    ):
        if self.dropout_rate > 0.0 or self.recurrent_dropout_rate > 0.0:
            # as flax.linen.Dropout: required (constructor or call) once dropout is configured
            deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        reverse = self.reverse if reverse is None else reverse
        time_major = self.time_major if time_major is None else time_major
        xs = jnp.asarray(xs)
        sizes = common.layer_input_sizes(
            xs.shape[-1], self.hidden_size, self.num_layers, self.bidirectional, self.merge, self.proj_size
        )
        layers: list[Any] = []
        for k, size in enumerate(sizes):
            if self.bidirectional:
                fwd = self._declare_layer(f"layer_{k}_forward", size)
                bwd = self._declare_layer(f"layer_{k}_backward", size)
                layers.append(BidirectionalParams(fwd, bwd))
            else:
                layers.append(self._declare_layer(f"layer_{k}", size))
        if self.learn_initial_state:
            shape = common.initial_state_shape(self.num_layers, self.bidirectional, self.hidden_size)
            cell = self.param("initial_cell", nn.initializers.zeros, shape, self.param_dtype)
            shape = common.initial_state_shape(self.num_layers, self.bidirectional, self.proj_size or self.hidden_size)
            hidden = self.param("initial_hidden", nn.initializers.zeros, shape, self.param_dtype)
            if initial_state is None:
                initial_state = common.learned_states(cell, hidden, xs, time_major, self.bidirectional)
        key = None
        if common.needs_dropout_key(deterministic, self.dropout_rate, self.recurrent_dropout_rate, self.num_layers):
            key = self.make_rng("dropout")
        ys, states = common.run(
            layers,
            xs,
            initial_state,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            seq_lengths=seq_lengths,
            mask=mask,
            merge=self.merge,
            reverse=reverse,
            time_major=time_major,
            unroll=self.unroll,
            bptt=self.bptt,
            backward=self.backward,
            checkpoint_every=self.checkpoint_every,
            dropout_rate=self.dropout_rate,
            recurrent_dropout_rate=self.recurrent_dropout_rate,
            dropout_key=key,
            impl=self.impl,
        )
        return (ys, states) if return_state else ys

    @nn.nowrap
    def layers(self, params: dict) -> tuple:
        """This module's ``params`` collection -> layers for :func:`jaxlstm.lstm_stack`."""
        params = params.get("params", params)
        out: list[Any] = []
        for k in range(self.num_layers):
            if self.bidirectional:
                out.append(
                    BidirectionalParams(
                        LSTMCell.to_params(params[f"layer_{k}_forward"]),
                        LSTMCell.to_params(params[f"layer_{k}_backward"]),
                    )
                )
            else:
                out.append(LSTMCell.to_params(params[f"layer_{k}"]))
        return tuple(out)

    @nn.nowrap
    def set_layers(self, variables: dict | None, layers) -> dict:
        """Layers of the functional API -> ``{"params": ...}`` for ``apply``.

        The functional counterpart of NNX's ``model.set_layers(layers)``:
        ``variables`` (this module's, or ``None``) are not changed; a new dict is
        returned with their other collections and the given layers as ``params``.
        """
        layers = tuple(layers)
        if len(layers) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers; received {len(layers)}.")
        params = {}
        for k, layer in enumerate(layers):
            if self.bidirectional:
                if not isinstance(layer, BidirectionalParams):
                    raise TypeError(f"layer {k} must be BidirectionalParams for a bidirectional module.")
                params[f"layer_{k}_forward"] = LSTMCell.from_params(layer.forward)
                params[f"layer_{k}_backward"] = LSTMCell.from_params(layer.backward)
            else:
                params[f"layer_{k}"] = LSTMCell.from_params(layer)
        out = {} if variables is None else {k: v for k, v in variables.items() if k != "params"}
        out["params"] = params
        return out

    @nn.nowrap
    def variables_from(self, layers) -> dict:
        """Deprecated: ``set_layers(None, layers)``."""
        warnings.warn(
            "jaxlstm.linen.LSTM.variables_from is deprecated and will be removed in jaxlstm 0.2.0; use "
            "set_layers(variables, layers), "
            "the name NNX's LSTM uses too.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.set_layers(None, layers)

    @nn.nowrap
    def initialize_carry(self, rng: jax.Array | None, input_shape: tuple[int, ...]) -> tuple:
        """Zero initial states for inputs of ``input_shape`` (``(B, T, I)``, ``(T, B, I)`` time-major, or ``(T, I)``).

        One :class:`jaxlstm.LSTMState` (or :class:`jaxlstm.BidirectionalState`)
        per layer, in ``param_dtype``: what ``initial_state`` takes and
        ``return_state=True`` returns. ``rng`` is unused (as in Flax's cells).
        """
        del rng
        return common.module_zero_states(self, input_shape)


class SequenceClassifier(nn.Module):
    """``Embed -> LSTM -> Dense`` on the final state: token sequences to class logits.

    Call: ``apply(variables, tokens, seq_lengths=None, deterministic=None)``
    with integer ``tokens`` ``(B, T)``; returns logits ``(B, num_classes)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlstm.linen import SequenceClassifier
      >>> model = SequenceClassifier(vocab_size=10, embed_dim=8, hidden_size=16, num_classes=3)
      >>> tokens = jnp.zeros((4, 12), jnp.int32)
      >>> variables = model.init(jax.random.key(0), tokens)
      >>> model.apply(variables, tokens, seq_lengths=jnp.array([12, 3, 5, 1])).shape
      (4, 3)
    """

    vocab_size: int
    embed_dim: int
    hidden_size: int
    num_classes: int
    num_layers: int = 1
    bidirectional: bool = False
    output_transform: bool = True
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, tokens, seq_lengths=None, deterministic: bool | None = None, mask=None):
        x = nn.Embed(self.vocab_size, self.embed_dim)(tokens)
        _, states = LSTM(
            self.hidden_size,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            output_transform=self.output_transform,
            dropout_rate=self.dropout_rate,
        )(x, seq_lengths=seq_lengths, mask=mask, deterministic=deterministic, return_state=True)
        return nn.Dense(self.num_classes)(common.final_summary(states, self.bidirectional))


class CharLM(nn.Module):
    """``Embed -> LSTM -> Dense``: a character (token) language model.

    ``dropout_rate`` applies between stacked layers and to the last layer's
    outputs before ``Dense``, ``input_dropout_rate`` to the embedded
    characters before the first layer (together, the non-recurrent
    connections, as in Zaremba et al., 2014); ``recurrent_dropout_rate``
    inside the recurrence.

    Call: ``apply(variables, tokens, initial_state=None, deterministic=None,
    return_state=False)`` with integer ``tokens`` ``(B, T)``; returns next-token
    logits ``(B, T, vocab_size)`` (and the final states, to continue a stream
    or to sample one step at a time).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlstm.linen import CharLM
      >>> model = CharLM(vocab_size=30, embed_dim=8, hidden_size=16, num_layers=2)
      >>> tokens = jnp.zeros((2, 5), jnp.int32)
      >>> variables = model.init(jax.random.key(0), tokens)
      >>> logits, states = model.apply(variables, tokens, return_state=True)
      >>> logits.shape, len(states)
      ((2, 5, 30), 2)
    """

    vocab_size: int
    embed_dim: int
    hidden_size: int
    num_layers: int = 1
    output_transform: bool = True
    dropout_rate: float = 0.0
    recurrent_dropout_rate: float = 0.0
    bptt: str | None = None
    backward: str | None = None
    input_dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, tokens, initial_state=None, deterministic: bool | None = None, return_state: bool = False):
        x = nn.Embed(self.vocab_size, self.embed_dim)(tokens)
        if self.input_dropout_rate > 0.0:
            x = nn.Dropout(self.input_dropout_rate)(x, deterministic=deterministic)
        ys, states = LSTM(
            self.hidden_size,
            num_layers=self.num_layers,
            output_transform=self.output_transform,
            dropout_rate=self.dropout_rate,
            recurrent_dropout_rate=self.recurrent_dropout_rate,
            bptt=self.bptt,
            backward=self.backward,
        )(x, initial_state, deterministic=deterministic, return_state=True)
        if self.dropout_rate > 0.0:
            ys = nn.Dropout(self.dropout_rate)(ys, deterministic=deterministic)
        logits = nn.Dense(self.vocab_size)(ys)
        return (logits, states) if return_state else logits
