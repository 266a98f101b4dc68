"""Streaming inference: a model run on inputs as they arrive, its state carried between calls."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ._checks import describe
from ._init import zero_state
from ._stack import lstm_stack
from ._types import Array, BidirectionalParams, LSTMParams, LSTMState


class Stepper:
    """A batch of independent streams, fed one step or a chunk at a time, the state carried in between.

    ``Stepper(step, state)`` wraps a pure ``step(state, x) -> (state, y)``
    and a first state (a pytree whose leaves have the streams on
    ``batch_axis``). It compiles ``step`` once per input shape (``jax.jit``,
    the old state's buffers donated to the new one), keeps the state, and
    returns ``y``. :meth:`for_stack` builds one for a stack of LSTM layers;
    any model with an explicit state fits (a Flax ``CharLM`` applied with
    ``return_state=True``, say).

    Streams are independent rows: :meth:`reset` zeroes (or sets) the state of
    some rows when a new stream starts there, without touching the others.
    Feeding a sequence in chunks gives what one call over the whole sequence
    gives (the same steps in the same order).

    Example:
      >>> import jax, jax.numpy as jnp, jaxlstm
      >>> layers = jaxlstm.init_stack(jax.random.key(0), 3, 8, num_layers=2)
      >>> stepper = jaxlstm.Stepper.for_stack(layers, batch_size=4)
      >>> stepper(jnp.ones((4, 3))).shape          # one step: (B, I) -> (B, H)
      (4, 8)
      >>> stepper(jnp.ones((4, 5, 3))).shape       # a chunk: (B, T, I) -> (B, T, H)
      (4, 5, 8)
      >>> stepper.reset(rows=[0])                  # a new stream starts in row 0
    """

    def __init__(self, step: Callable[[Any, Any], tuple[Any, Any]], state: Any, *, batch_axis: int = 0):
        if not callable(step):
            raise TypeError(f"Stepper: step must be a function (state, x) -> (state, y); received {describe(step)}.")
        leaves = jax.tree.leaves(state)
        if not leaves:
            raise ValueError("Stepper: the state has no arrays; give the first state, e.g. zeros.")
        sizes = {jnp.shape(a)[batch_axis] if jnp.ndim(a) > batch_axis else None for a in leaves}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                f"Stepper: every state array needs the streams on axis {batch_axis} with one size; "
                f"received shapes {[jnp.shape(a) for a in leaves]}."
            )
        (size,) = sizes
        self.batch_size: int = int(size)  # type: ignore[arg-type]
        self.batch_axis = batch_axis
        self._first = jax.tree.map(jnp.asarray, state)
        self.state = jax.tree.map(jnp.array, state)  # copies: the first state survives the donation
        self._step = jax.jit(lambda s, x: step(s, x), donate_argnums=(0,))

    @classmethod
    def for_stack(
        cls, layers: Sequence[LSTMParams], batch_size: int, *, state: Sequence[LSTMState] | None = None
    ) -> Stepper:
        """A stepper over a stack of unidirectional layers (``jaxlstm.init_stack``, a module's ``layers``).

        Input ``(B, I)`` for one step (output ``(B, H)``) or ``(B, T, I)`` for a
        chunk (output ``(B, T, H)``); ``B = batch_size`` streams. The state
        starts at zeros, or at ``state`` (one ``LSTMState`` per layer).
        """
        layers = tuple(layers)
        if not layers or any(isinstance(p, BidirectionalParams) for p in layers):
            raise ValueError(
                "Stepper.for_stack: streaming needs unidirectional layers (a backward direction reads the whole "
                f"sequence before its first output); received {describe(layers)}."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Stepper.for_stack: batch_size must be a positive int; received {batch_size!r}.")
        if state is None:
            state = tuple(zero_state(p, (batch_size,)) for p in layers)

        def step(states: tuple, x: Array) -> tuple[tuple, Array]:
            x = jnp.asarray(x)
            single = x.ndim == 2
            ys, finals = lstm_stack(layers, x[:, None] if single else x, states)
            return finals, (ys[:, 0] if single else ys)

        return cls(step, tuple(state))

    def __call__(self, x: Any) -> Any:
        """Feed ``x`` (one step or a chunk, as the step function takes it); returns its output."""
        self.state, y = self._step(self.state, x)
        return y

    def reset(self, rows: Sequence[int] | Array | None = None, state: Any = None) -> None:
        """Start new streams: the state of ``rows`` (all by default) goes back to the first state (or ``state``)."""
        target = self._first if state is None else state
        if rows is None:
            self.state = jax.tree.map(jnp.array, target)
            return
        rows = jnp.asarray(rows, jnp.int32).reshape(-1)
        if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= self.batch_size):
            raise ValueError(f"Stepper.reset: rows must lie in [0, {self.batch_size}); received {rows.tolist()}.")
        axis = self.batch_axis

        def put(current: Array, first: Array) -> Array:
            picked = jnp.take(first, rows, axis=axis) if jnp.shape(first) == jnp.shape(current) else first
            index = (slice(None),) * axis + (rows,)
            return current.at[index].set(picked)

        self.state = jax.tree.map(put, self.state, target)
