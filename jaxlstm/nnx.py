"""Flax NNX modules: :class:`LSTMCell` (NNX's cell protocol) and :class:`LSTM` (a full layer stack).

Both hold their weights as ``nnx.Param`` fields named like the fields of
:class:`jaxlstm.LSTMParams` and call the functional core. ``cell.params`` /
``model.layers`` give the functional API's parameters, ``set_params`` /
``set_layers`` write them back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from . import _flax_common as common
from ._checks import check_rate
from ._init import layer_initializers, param_shapes
from ._types import BidirectionalParams, Initializer, LSTMParams, LSTMState


def _check_rngs(rngs: Any, where: str) -> None:
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(
            f"{where} needs rngs=nnx.Rngs(...) to initialise its weights (e.g. rngs=nnx.Rngs(0)); received "
            f"{type(rngs).__name__}."
        )


__all__ = ["LSTMCell", "LSTM", "SequenceClassifier", "CharLM"]


class LSTMCell(nnx.RNNCellBase):
    """One LSTM step as an NNX cell: ``__call__(carry, x) -> (carry, y)``.

    Works with ``flax.nnx.RNN`` and ``flax.nnx.Bidirectional``. The carry is
    a :class:`jaxlstm.LSTMState` ``(cell, hidden)``, each ``(*B, H)``. A plain ``(c, h)``
    tuple is accepted and returned as a tuple; the carry keeps the dtype it
    was given (``param_dtype`` from ``initialize_carry``) whatever the
    compute ``dtype``.

    The Flax drivers scan this cell with plain autodiff. For speed, run whole
    sequences with :class:`LSTM` instead: it uses the hand-written backward
    pass of :func:`jaxlstm.lstm`.

    Args:
      in_features: ``I``.
      hidden_size: ``H``.
      output_transform: ``True`` for the output-map cell (``tanh(W_o c + b_o)`` in the
        output gate), ``False`` for the classic cell (``tanh(c)``).
      dtype: compute dtype (``None``: promote input and params).
      param_dtype: parameter dtype.
      kernel_init, recurrent_init, bias_init, forget_bias, output_init, output_bias_init: see
        :func:`jaxlstm.init_params`.
      proj_size: ``P``: project the hidden state (LSTMP); the carry is then
        ``(c (*B, H), a (*B, P))``.
      rngs: ``nnx.Rngs`` (its ``params`` stream initialises the weights).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxlstm.nnx import LSTMCell
      >>> rnn = nnx.RNN(LSTMCell(3, 4, rngs=nnx.Rngs(0)))
      >>> rnn(jnp.ones((2, 7, 3))).shape
      (2, 7, 4)
    """

    def __init__(
        self,
        in_features: int,
        hidden_size: int,
        *,
        output_transform: bool = True,
        dtype: Any | None = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Initializer | None = None,
        recurrent_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        forget_bias: float = 1.0,
        output_init: Initializer | None = None,
        output_bias_init: Initializer | None = None,
        proj_size: int | None = None,
        rngs: nnx.Rngs,
    ):
        _check_rngs(rngs, "jaxlstm.nnx.LSTMCell")
        self.in_features = in_features
        self.hidden_size = hidden_size
        self.proj_size = proj_size
        self.dtype = dtype
        self.param_dtype = param_dtype
        inits = layer_initializers(
            kernel_init=kernel_init,
            recurrent_init=recurrent_init,
            bias_init=bias_init,
            forget_bias=forget_bias,
            output_init=output_init,
            output_bias_init=output_bias_init,
        )
        shapes = param_shapes(in_features, hidden_size, output_transform, proj_size)
        for name in LSTMParams._fields:
            if name in shapes:
                setattr(self, name, nnx.Param(inits[name](rngs.params(), shapes[name], param_dtype)))
            else:
                setattr(self, name, nnx.data(None))

    @property
    def params(self) -> LSTMParams:
        """The weights as :class:`jaxlstm.LSTMParams` (a view of the current values)."""
        values: dict[str, Any] = {n: getattr(self, n) for n in LSTMParams._fields}
        arrays: dict[str, Any] = {n: None if v is None else v[...] for n, v in values.items()}
        return LSTMParams(**arrays)

    def set_params(self, params: LSTMParams) -> None:
        """Overwrite the weights from :class:`jaxlstm.LSTMParams` of the same shapes and cell type."""
        for name, value in zip(LSTMParams._fields, params):
            current = getattr(self, name)
            if (current is None) != (value is None):
                has = "has no" if current is None else "has a"
                raise ValueError(
                    f"cannot set {name}: this cell {has} {name} and the params describe another kind of cell "
                    "(w_o, b_o: the output map; w_hr: the projection)."
                )
            if value is not None:
                if value.shape != current[...].shape:
                    raise ValueError(f"{name} has shape {value.shape}; this cell expects {current[...].shape}.")
                current[...] = jnp.asarray(value, current[...].dtype)

    def __call__(self, carry: LSTMState, x: jax.Array) -> tuple[LSTMState, jax.Array]:
        return common.cell_step(self.params, carry, x, self.dtype, self.param_dtype)

    def initialize_carry(
        self, input_shape: tuple[int, ...], rngs: Any = None, carry_init: Any = None
    ) -> tuple[jax.Array, jax.Array]:
        """The initial carry ``(c, h)`` for inputs of ``input_shape``: ``input_shape[:-1] + (H,)`` (``P`` for
        the hidden state with a projection).

        A plain tuple, as Flax's own cells give, so a subclass that unpacks
        the carry and calls this cell with ``(c, h)`` scans in ``nnx.RNN``.

        Zeros by default. With ``carry_init`` (an initializer ``init(key, shape,
        dtype)``, as in Flax's cells) both fields are drawn from it with keys
        from ``rngs`` (``nnx.Rngs``, its ``carry`` stream if it has one).
        """
        batch = tuple(input_shape[:-1])
        if carry_init is None:
            c, h = common.zero_carry(batch, self.hidden_size, self.proj_size, self.param_dtype)
            return c, h
        if rngs is None:
            raise ValueError("initialize_carry: carry_init needs rngs (an nnx.Rngs) to draw the carry from.")
        stream = rngs.carry if "carry" in rngs else rngs.default
        cell = carry_init(stream(), batch + (self.hidden_size,), self.param_dtype)
        return cell, carry_init(stream(), batch + (self.proj_size or self.hidden_size,), self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1


class LSTM(nnx.Module):
    """A stack of (optionally bidirectional) LSTM layers, as an NNX module.

    Args:
      in_features: ``I`` of the first layer.
      hidden_size: ``H`` of every layer.
      num_layers, bidirectional, merge, output_transform, dropout_rate, recurrent_dropout_rate: as in
        :class:`jaxlstm.linen.LSTM`.
      dtype, param_dtype, initializers, unroll, reverse, time_major, bptt, checkpoint_every: as in
        :class:`jaxlstm.linen.LSTM`; ``reverse`` and ``time_major`` can be overridden per call.
      proj_size: ``P``: every layer projects its hidden state to ``P`` features (LSTMP).
      impl: ``"auto"``, ``"scan"``, ``"cudnn"``, ``"pallas"`` or ``"pallas_interpret"`` (see :func:`jaxlstm.lstm`).
      learn_initial_state: trainable initial states ``initial_cell`` and
        ``initial_hidden`` ``(num_layers, directions, H)`` (zeros at init),
        as in :class:`jaxlstm.linen.LSTM`.
      deterministic: dropout off when ``True``; flipped by ``model.eval()`` /
        ``model.train()`` as for ``nnx.Dropout``, and overridable per call.
      rngs: ``nnx.Rngs``; its ``params`` stream initialises the weights and,
        when a dropout rate is set, its ``dropout`` stream is kept for masks.

    Call: ``model(xs, initial_state=None, *, seq_lengths=None, mask=None,
    deterministic=None, return_state=False, rngs=None)`` with the same
    shapes and results as :class:`jaxlstm.linen.LSTM`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxlstm.nnx import LSTM
      >>> model = LSTM(3, 8, num_layers=2, dropout_rate=0.1, rngs=nnx.Rngs(0))
      >>> model(jnp.ones((4, 10, 3))).shape
      (4, 10, 8)
      >>> model.eval()  # dropout off
      >>> model(jnp.ones((4, 10, 3)), seq_lengths=jnp.array([10, 9, 5, 0])).shape
      (4, 10, 8)
    """

    def __init__(
        self,
        in_features: int,
        hidden_size: int,
        *,
        num_layers: int = 1,
        bidirectional: bool = False,
        merge: str | Callable[[jax.Array, jax.Array], Any] | None = "concat",
        output_transform: bool = True,
        dropout_rate: float = 0.0,
        recurrent_dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype: Any | None = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Initializer | None = None,
        recurrent_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        forget_bias: float = 1.0,
        output_init: Initializer | None = None,
        output_bias_init: Initializer | None = None,
        unroll: int = 1,
        reverse: bool = False,
        time_major: bool = False,
        bptt: str | None = None,
        checkpoint_every: int | None = None,
        backward: str | None = None,
        learn_initial_state: bool = False,
        proj_size: int | None = None,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        _check_rngs(rngs, "jaxlstm.nnx.LSTM")
        sizes = common.layer_input_sizes(in_features, hidden_size, num_layers, bidirectional, merge, proj_size)
        check_rate(dropout_rate, "dropout_rate")
        check_rate(recurrent_dropout_rate, "recurrent_dropout_rate")
        self.in_features = in_features
        self.hidden_size = hidden_size
        self.proj_size = proj_size
        self.impl = impl
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.merge = merge
        self.dropout_rate = dropout_rate
        self.recurrent_dropout_rate = recurrent_dropout_rate
        self.deterministic = deterministic
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.unroll = unroll
        self.reverse = reverse
        self.time_major = time_major
        self.bptt = bptt
        self.backward = backward  # deprecated name of bptt, resolved (with a warning) at call time
        self.checkpoint_every = checkpoint_every
        cell_kw = dict(
            output_transform=output_transform,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            recurrent_init=recurrent_init,
            bias_init=bias_init,
            forget_bias=forget_bias,
            output_init=output_init,
            output_bias_init=output_bias_init,
            proj_size=proj_size,
            rngs=rngs,
        )
        self.forward_cells = nnx.List([LSTMCell(size, hidden_size, **cell_kw) for size in sizes])
        if bidirectional:
            self.backward_cells = nnx.List([LSTMCell(size, hidden_size, **cell_kw) for size in sizes])
        else:
            self.backward_cells = nnx.data(None)  # type: ignore[arg-type]
        if learn_initial_state:
            shape = common.initial_state_shape(num_layers, bidirectional, hidden_size)
            self.initial_cell = nnx.Param(jnp.zeros(shape, param_dtype))
            shape = common.initial_state_shape(num_layers, bidirectional, proj_size or hidden_size)
            self.initial_hidden = nnx.Param(jnp.zeros(shape, param_dtype))
        else:
            self.initial_cell = nnx.data(None)  # type: ignore[arg-type]
            self.initial_hidden = nnx.data(None)  # type: ignore[arg-type]
        if dropout_rate > 0.0 or recurrent_dropout_rate > 0.0:
            self.rngs = rngs.dropout.fork()
        else:
            self.rngs = nnx.data(None)

    @property
    def layers(self) -> tuple:
        """The weights as layers for :func:`jaxlstm.lstm_stack`."""
        if self.backward_cells is None:
            return tuple(c.params for c in self.forward_cells)
        return tuple(BidirectionalParams(f.params, b.params) for f, b in zip(self.forward_cells, self.backward_cells))

    def set_layers(self, layers) -> None:
        """Overwrite the weights from layers of the functional API (same shapes)."""
        layers = tuple(layers)
        if len(layers) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers; received {len(layers)}.")
        for k, layer in enumerate(layers):
            if self.backward_cells is None:
                self.forward_cells[k].set_params(layer)
            else:
                if not isinstance(layer, BidirectionalParams):
                    raise TypeError(f"layer {k} must be BidirectionalParams for a bidirectional module.")
                self.forward_cells[k].set_params(layer.forward)
                self.backward_cells[k].set_params(layer.backward)

    def initialize_carry(self, input_shape: tuple[int, ...], rngs: Any = None) -> tuple:
        """Zero initial states for inputs of ``input_shape`` (``(B, T, I)``, ``(T, B, I)`` time-major, or ``(T, I)``).

        One :class:`jaxlstm.LSTMState` (or :class:`jaxlstm.BidirectionalState`)
        per layer, in ``param_dtype``: what ``initial_state`` takes and
        ``return_state=True`` returns. ``rngs`` is unused (as in Flax's cells).
        """
        del rngs
        return common.module_zero_states(self, input_shape)

    def __call__(
        self,
        xs: jax.Array,
        initial_state=None,
        *,
        seq_lengths: jax.Array | None = None,
        mask: jax.Array | None = None,
        deterministic: bool | None = None,
        return_state: bool = False,
        rngs: nnx.Rngs | None = None,
        reverse: bool | None = None,
        time_major: bool | None = None,
    ):
        deterministic = self.deterministic if deterministic is None else deterministic
        reverse = self.reverse if reverse is None else reverse
        time_major = self.time_major if time_major is None else time_major
        if initial_state is None and self.initial_cell is not None and self.initial_hidden is not None:
            initial_state = common.learned_states(
                self.initial_cell[...], self.initial_hidden[...], jnp.asarray(xs), time_major, self.bidirectional
            )
        key = None
        if common.needs_dropout_key(deterministic, self.dropout_rate, self.recurrent_dropout_rate, self.num_layers):
            if rngs is not None:
                key = rngs.dropout()
            elif self.rngs is not None:
                key = self.rngs()
            else:
                raise ValueError("dropout is active (deterministic=False) but no rngs were given to the LSTM.")
        ys, states = common.run(
            self.layers,
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


class SequenceClassifier(nnx.Module):
    """``Embed -> LSTM -> Linear`` on the final state: token sequences to class logits.

    Call: ``model(tokens, seq_lengths=None, deterministic=None, mask=None)`` with integer
    ``tokens`` ``(B, T)``; returns logits ``(B, num_classes)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxlstm.nnx import SequenceClassifier
      >>> model = SequenceClassifier(10, 8, 16, 3, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((4, 12), jnp.int32), seq_lengths=jnp.array([12, 3, 5, 1])).shape
      (4, 3)
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        hidden_size: int,
        num_classes: int,
        *,
        num_layers: int = 1,
        bidirectional: bool = False,
        output_transform: bool = True,
        dropout_rate: float = 0.0,
        rngs: nnx.Rngs,
    ):
        _check_rngs(rngs, "jaxlstm.nnx.SequenceClassifier")
        self.bidirectional = bidirectional
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        self.lstm = LSTM(
            embed_dim,
            hidden_size,
            num_layers=num_layers,
            bidirectional=bidirectional,
            output_transform=output_transform,
            dropout_rate=dropout_rate,
            rngs=rngs,
        )
        self.head = nnx.Linear(hidden_size * (2 if bidirectional else 1), num_classes, rngs=rngs)

    def __call__(self, tokens, seq_lengths=None, deterministic: bool | None = None, mask=None):
        _, states = self.lstm(
            self.embed(tokens), seq_lengths=seq_lengths, mask=mask, deterministic=deterministic, return_state=True
        )
        return self.head(common.final_summary(states, self.bidirectional))


class CharLM(nnx.Module):
    """``Embed -> LSTM -> Linear``: a character (token) language model.

    ``dropout_rate`` applies between stacked layers and to the last layer's
    outputs before ``Linear``; ``input_dropout_rate`` to the embedded
    characters before the first layer; ``recurrent_dropout_rate`` inside the
    recurrence.

    Call: ``model(tokens, initial_state=None, deterministic=None,
    return_state=False)``; returns next-token logits ``(B, T, vocab_size)``
    (and the final states).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxlstm.nnx import CharLM
      >>> model = CharLM(30, 8, 16, num_layers=2, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 5), jnp.int32)).shape
      (2, 5, 30)
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        hidden_size: int,
        *,
        num_layers: int = 1,
        output_transform: bool = True,
        dropout_rate: float = 0.0,
        recurrent_dropout_rate: float = 0.0,
        input_dropout_rate: float = 0.0,
        bptt: str | None = None,
        backward: str | None = None,
        rngs: nnx.Rngs,
    ):
        _check_rngs(rngs, "jaxlstm.nnx.CharLM")
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        self.lstm = LSTM(
            embed_dim,
            hidden_size,
            num_layers=num_layers,
            output_transform=output_transform,
            dropout_rate=dropout_rate,
            recurrent_dropout_rate=recurrent_dropout_rate,
            bptt=bptt,
            backward=backward,
            rngs=rngs,
        )
        self.head = nnx.Linear(hidden_size, vocab_size, rngs=rngs)
        self.drop = nnx.Dropout(dropout_rate, rngs=rngs) if dropout_rate > 0.0 else nnx.data(None)
        # made after every parameter, so that the dropout settings leave the initialisation as it is
        self.input_drop = nnx.Dropout(input_dropout_rate, rngs=rngs) if input_dropout_rate > 0.0 else nnx.data(None)

    def __call__(self, tokens, initial_state=None, deterministic: bool | None = None, return_state: bool = False):
        x = self.embed(tokens)
        if self.input_drop is not None:
            x = self.input_drop(x, deterministic=deterministic)
        ys, states = self.lstm(x, initial_state, deterministic=deterministic, return_state=True)
        if self.drop is not None:
            ys = self.drop(ys, deterministic=deterministic)
        logits = self.head(ys)
        return (logits, states) if return_state else logits
