"""The optimizer and the jit-compiled training and evaluation steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state as flax_train_state

TrainState = flax_train_state.TrainState
LossFn = Callable[..., tuple[jax.Array, tuple[dict, Any]]]


def default_optimizer(
    learning_rate: float = 3e-3,
    *,
    total_steps: int = 1000,
    warmup_steps: int | None = None,
    clip_norm: float = 1.0,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """``clip_by_global_norm(clip_norm)`` then AdamW with linear warm-up and cosine decay to 10%.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlstm.training import default_optimizer
      >>> tx = default_optimizer(1e-3, total_steps=100)
      >>> state = tx.init({"w": jnp.zeros(3)})
    """
    warmup = max(1, total_steps // 20) if warmup_steps is None else warmup_steps
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=0.1 * learning_rate
    )
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))


def tree_finite(tree) -> jax.Array:
    """A boolean scalar: every inexact leaf of ``tree`` is finite (traceable)."""
    leaves = [
        jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(a), jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(loss_fn: LossFn, *, donate: bool = True) -> Callable:
    """A jit-compiled training step for ``loss_fn``.

    Args:
      loss_fn: ``loss_fn(params, state, batch, rng, carry) -> (loss, (metrics, new_carry))``
        where ``state`` is the :class:`TrainState` (use ``state.apply_fn``),
        ``metrics`` a dict of scalars and ``carry`` the recurrent state handed
        from the previous step (``None`` when not used; truncated BPTT).
      donate: donate the train state's buffers to the step.

    Returns:
      ``step(state, batch, rng, carry) -> (state, metrics, carry)``: ``metrics``
      holds ``loss``, ``grad_norm`` and ``finite`` too; ``carry`` leaves with
      its gradient stopped, so the next step starts a new truncation window.
      When the loss, the gradient norm or any updated parameter or optimizer
      value is not finite, the update is skipped (state and carry come back
      unchanged) and ``finite`` is false; :func:`fit` then stops.

    On a mesh (the state replicated, the batch split along ``"data"``), the
    loss is the mean over the global batch and its gradient is the global
    one: XLA inserts the all-reduce, so the same ``loss_fn`` serves one
    device, many, and many processes.
    """

    def step(state: TrainState, batch, rng, carry):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (metrics, new_carry)), grads = grad_fn(state.params, state, batch, rng, carry)
        # finite loss *and* gradients *and* updated params and optimizer state: a NaN that reaches
        # only the gradients (or a NaN learning rate) is caught here too. A non-finite update leaves
        # state and carry as they were (the inputs are donated: this is how the last good values
        # survive for the NaN guard to save).
        grad_norm = optax.tree.norm(grads)
        updated = state.apply_gradients(grads=grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & tree_finite((updated.params, updated.opt_state))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = keep(updated, state)
        if carry is not None:
            new_carry = keep(new_carry, carry)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=ok)
        return new_state, metrics, jax.lax.stop_gradient(new_carry)

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(loss_fn: LossFn) -> Callable:
    """``eval_step(state, batch, rng, carry) -> (metrics, carry)``, jit-compiled, no gradients."""

    def step(state, batch, rng, carry):
        loss, (metrics, new_carry) = loss_fn(state.params, state, batch, rng, carry)
        return dict(metrics, loss=loss), new_carry

    return jax.jit(step)


def nnx_train_state(model: Any, tx: optax.GradientTransformation) -> TrainState:
    """A :class:`TrainState` for a Flax NNX model, so that :func:`make_train_step` and :func:`fit` train it.

    The model's ``nnx.Param`` values become ``state.params`` (a plain nested
    dict, which checkpoints like a linen model's); ``state.apply_fn(params,
    *args, **kwargs)`` calls the model with those values. Everything else in
    the model (RNG streams, batch statistics) is held fixed: for dropout, pass
    ``rngs=nnx.Rngs(dropout=rng)`` in the call, with the ``rng`` that
    ``loss_fn`` receives for its step. :func:`nnx_update` writes trained
    params back into the model.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> from jaxlstm.nnx import LSTM
      >>> from jaxlstm.training import nnx_train_state
      >>> model = LSTM(3, 4, rngs=nnx.Rngs(0))
      >>> state = nnx_train_state(model, optax.adam(1e-3))
      >>> state.apply_fn(state.params, jnp.ones((2, 5, 3))).shape
      (2, 5, 4)
    """
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]

    def apply_fn(values: Any, *args: Any, **kwargs: Any) -> Any:
        current = jax.tree.map(lambda v: v, params)  # a fresh State of the same structure
        nnx.replace_by_pure_dict(current, values)
        return nnx.merge(graphdef, current, rest)(*args, **kwargs)

    return TrainState.create(apply_fn=apply_fn, params=nnx.to_pure_dict(params), tx=tx)


def nnx_update(model: Any, state: TrainState) -> Any:
    """Write ``state.params`` (from :func:`nnx_train_state`, trained) into ``model``; returns ``model``."""
    from flax import nnx

    current = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(current, dict(state.params))
    nnx.update(model, current)
    return model
