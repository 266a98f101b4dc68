"""Training utilities on top of optax, Flax's ``TrainState`` and orbax-checkpoint.

The pieces compose; none of them owns your model:

* losses for sequences: :func:`sequence_cross_entropy` (masked, nats; divide
  by ``ln 2`` with :func:`to_bits` for bits per character), :func:`masked_mse`;
* :func:`default_optimizer`: global-norm clipping + AdamW with a warm-up /
  cosine schedule; any ``optax.GradientTransformation`` can replace it;
* :func:`make_train_step` / :func:`make_eval_step`: jit-compiled steps (the
  train state's buffers are donated) for a loss function you write;
* :func:`fit`: the loop — steps, periodic evaluation, a tqdm progress bar with
  the live loss, a JSON-lines metrics file, orbax checkpoints every N steps
  (keep the last K), bit-for-bit resume, a clean stop on Ctrl-C (after
  saving), and a guard that stops on a NaN/inf loss naming the step;
* truncated backpropagation through time: a step may carry a recurrent state
  to the next (gradients stop at the chunk boundary);
* data parallelism: pass a ``jax.sharding.Mesh`` with a ``"data"`` axis to
  :func:`fit` (:func:`data_mesh` builds one): the batch is sharded over it,
  the parameters replicated.

Data is a function ``batch_fn(step) -> batch`` of the step number, so that the
data position is part of the step and a resumed run sees exactly the batches
it would have seen.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any, Callable, NamedTuple, Optional

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state as flax_train_state

TrainState = flax_train_state.TrainState

__all__ = [
    "TrainState",
    "FitResult",
    "NonFiniteLossError",
    "sequence_mask",
    "sequence_cross_entropy",
    "masked_mse",
    "to_bits",
    "default_optimizer",
    "make_train_step",
    "make_eval_step",
    "data_mesh",
    "Checkpointer",
    "fit",
]


# ------------------------------------------------------------------ losses


def sequence_mask(seq_lengths: jax.Array, num_steps: int) -> jax.Array:
    """``(B, T)`` boolean mask, true at ``t < seq_lengths[b]``."""
    return jnp.arange(num_steps)[None, :] < jnp.asarray(seq_lengths)[:, None]


def _weights(shape_bt, seq_lengths, mask, dtype):
    if seq_lengths is not None and mask is not None:
        raise ValueError("give either seq_lengths or mask, not both.")
    if seq_lengths is not None:
        mask = sequence_mask(seq_lengths, shape_bt[1])
    if mask is None:
        return jnp.ones(shape_bt, dtype)
    mask = jnp.asarray(mask)
    if mask.shape != tuple(shape_bt):
        raise ValueError(f"mask must have shape {tuple(shape_bt)} (B, T); received {mask.shape}.")
    return mask.astype(dtype)


def sequence_cross_entropy(logits, targets, *, seq_lengths=None, mask=None) -> jax.Array:
    """Mean next-token cross-entropy in nats over the valid steps.

    Args:
      logits: ``(B, T, V)``.
      targets: ``(B, T)`` integer classes.
      seq_lengths: optional ``(B,)``: steps ``t >= L`` are ignored.
      mask: optional ``(B, T)`` weights (alternative to ``seq_lengths``).

    Returns:
      A scalar: the sum of per-step losses over valid steps / their number.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlstm.training import sequence_cross_entropy, to_bits
      >>> logits = jnp.zeros((2, 3, 4))              # uniform over 4 classes
      >>> loss = sequence_cross_entropy(logits, jnp.zeros((2, 3), jnp.int32), seq_lengths=jnp.array([3, 1]))
      >>> round(float(to_bits(loss)), 6)             # log2(4) bits
      2.0
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 3 or jnp.shape(targets) != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and targets (B, T); received {logits.shape} and {jnp.shape(targets)}."
        )
    per_step = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    w = _weights(per_step.shape, seq_lengths, mask, per_step.dtype)
    return jnp.sum(per_step * w) / jnp.maximum(jnp.sum(w), 1.0)


def masked_mse(predictions, targets, *, seq_lengths=None, mask=None) -> jax.Array:
    """Mean squared error over the valid steps of ``(B, T, ...)`` arrays.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlstm.training import masked_mse
      >>> float(masked_mse(jnp.ones((2, 3)), jnp.zeros((2, 3)), seq_lengths=jnp.array([3, 0])))
      1.0
    """
    predictions, targets = jnp.asarray(predictions), jnp.asarray(targets)
    if predictions.shape != targets.shape or predictions.ndim < 2:
        raise ValueError(
            f"predictions and targets must share a (B, T, ...) shape; received {predictions.shape} and {targets.shape}."
        )
    err = (predictions - targets) ** 2
    err = err.reshape(err.shape[:2] + (-1,)).mean(-1)
    w = _weights(err.shape, seq_lengths, mask, err.dtype)
    return jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1.0)


def to_bits(nats):
    """Nats to bits (divide by ``ln 2``)."""
    return nats / math.log(2.0)


# ------------------------------------------------------------------ optimizer and steps


def default_optimizer(
    learning_rate: float = 3e-3,
    *,
    total_steps: int = 1000,
    warmup_steps: Optional[int] = None,
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


LossFn = Callable[..., tuple[jax.Array, tuple[dict, Any]]]


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
      holds ``loss`` and ``grad_norm`` too; ``carry`` leaves with its gradient
      stopped, so the next step starts a new truncation window. When the loss
      is not finite the update is skipped: state and carry come back unchanged.
    """

    def step(state: TrainState, batch, rng, carry):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (metrics, new_carry)), grads = grad_fn(state.params, state, batch, rng, carry)
        # a non-finite loss leaves state and carry as they were (the inputs are donated,
        # so this is how the last good values survive for the NaN guard to save)
        ok = jnp.isfinite(loss)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = keep(state.apply_gradients(grads=grads), state)
        if carry is not None:
            new_carry = keep(new_carry, carry)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        return new_state, metrics, jax.lax.stop_gradient(new_carry)

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(loss_fn: LossFn) -> Callable:
    """``eval_step(state, batch, rng, carry) -> (metrics, carry)``, jit-compiled, no gradients."""

    def step(state, batch, rng, carry):
        loss, (metrics, new_carry) = loss_fn(state.params, state, batch, rng, carry)
        return dict(metrics, loss=loss), new_carry

    return jax.jit(step)


# ------------------------------------------------------------------ sharding


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh over ``devices`` (default: all) with the axis name ``"data"``."""
    devices = jax.devices() if devices is None else devices
    return jax.sharding.Mesh(np.asarray(devices), ("data",))


def _replicate(tree, mesh):
    return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _shard_batch(tree, mesh):
    n = mesh.shape["data"]

    def put(a):
        a = jnp.asarray(a)
        if a.ndim == 0 or a.shape[0] % n:
            raise ValueError(
                f"a batch array of shape {a.shape} cannot be split over {n} devices along its first axis; "
                f"use a batch size divisible by {n}."
            )
        return jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))

    return jax.tree.map(put, tree)


# ------------------------------------------------------------------ checkpoints


class Checkpointer:
    """orbax-checkpoint behind three calls: ``save``, ``latest_step``, ``restore``.

    Saves every ``save_every`` steps (and whenever forced), keeps the last
    ``keep``. What is saved is a pytree of arrays; :func:`fit` stores the train
    state (params, optimizer state, step), the rng and the carried state.
    """

    def __init__(self, directory, *, save_every: int = 0, keep: int = 3):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(1, save_every) if save_every else 1,
            enable_async_checkpointing=False,
            create=True,
        )
        self.save_every = save_every
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
        )

    def save(self, step: int, tree, *, force: bool = False) -> bool:
        if not force and (not self.save_every or step % self.save_every):
            return False
        if step in self._manager.all_steps():
            return False
        saved = self._manager.save(step, args=self._ocp.args.StandardSave(tree), force=True)
        self._manager.wait_until_finished()
        return saved

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def restore(self, step: Optional[int], template):
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}.")
        # compare shapes first: a mismatched restore fails deep inside orbax's async reads
        meta = self._manager.item_metadata(step)
        meta = getattr(meta, "tree", meta)
        saved = sorted(tuple(m.shape) for m in jax.tree.leaves(meta) if hasattr(m, "shape"))
        wanted = sorted(tuple(np.shape(a)) for a in jax.tree.leaves(template))
        if saved != wanted:
            raise ValueError(
                f"the checkpoint at step {step} in {self.directory} holds arrays of other shapes than this model "
                f"({len(saved)} saved arrays vs {len(wanted)} expected; first differences: "
                f"{[p for p in zip(saved, wanted) if p[0] != p[1]][:3]})."
            )
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), template)
        return self._manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self._manager.close()


# ------------------------------------------------------------------ the loop


class NonFiniteLossError(FloatingPointError):
    """Training stopped because the loss became NaN or infinite."""


class FitResult(NamedTuple):
    state: TrainState
    carry: Any
    history: list  # dicts: {"step", "loss", ...} and {"step", "eval_...": ...}
    interrupted: bool


def _snapshot(state: TrainState, rng, carry) -> dict:
    return {
        "train_state": flax.serialization.to_state_dict({"params": state.params, "opt_state": state.opt_state}),
        "step": jnp.asarray(state.step, jnp.int64 if jax.config.jax_enable_x64 else jnp.int32),
        "rng": jax.random.key_data(rng),
        "carry": carry,
    }


def _from_snapshot(template_state: TrainState, snap: dict, carry_template):
    restored = flax.serialization.from_state_dict(
        {"params": template_state.params, "opt_state": template_state.opt_state}, snap["train_state"]
    )
    state = template_state.replace(step=int(snap["step"]), params=restored["params"], opt_state=restored["opt_state"])
    carry = snap["carry"] if carry_template is not None else None
    return state, jax.random.wrap_key_data(snap["rng"]), carry


def _scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()}


def fit(
    state: TrainState,
    train_step: Callable,
    batch_fn: Callable[[int], Any],
    *,
    num_steps: int,
    rng: jax.Array,
    carry: Any = None,
    eval_fn: Optional[Callable[[TrainState], dict]] = None,
    eval_every: int = 0,
    checkpoint_dir=None,
    save_every: int = 0,
    keep: int = 3,
    resume: bool = True,
    metrics_path=None,
    log_every: int = 10,
    progress: bool = True,
    mesh: Optional[jax.sharding.Mesh] = None,
    on_eval: Optional[Callable[[int, dict], None]] = None,
) -> FitResult:
    """Train for ``num_steps`` steps (in total, counting steps of a resumed run).

    Args:
      state: a :class:`TrainState` (``TrainState.create(apply_fn=..., params=..., tx=...)``).
      train_step: from :func:`make_train_step`.
      batch_fn: ``batch_fn(step) -> batch``, deterministic in ``step``.
      num_steps: the step to stop at.
      rng: base PRNG key; step ``s`` uses ``jax.random.fold_in(rng, s)``.
      carry: initial recurrent state for truncated BPTT (``None``: stateless).
      eval_fn: ``eval_fn(state) -> dict`` of scalars, run every ``eval_every``
        steps and at the end; its values are logged with an ``eval_`` prefix.
      checkpoint_dir: where orbax checkpoints go (``None``: no checkpoints).
      save_every, keep: checkpoint every ``save_every`` steps, keep the last ``keep``;
        a checkpoint is also written at the end and on Ctrl-C.
      resume: continue from the latest checkpoint in ``checkpoint_dir`` if any.
      metrics_path: JSON-lines file, appended with a record every ``log_every``
        steps and at each evaluation.
      progress: show a tqdm progress bar with the live loss.
      mesh: a mesh with a ``"data"`` axis: batches are sharded over it and the
        state replicated (data-parallel training).
      on_eval: called as ``on_eval(step, eval_metrics)`` after each evaluation.

    Returns:
      :class:`FitResult` ``(state, carry, history, interrupted)``.

    Raises:
      NonFiniteLossError: the loss became NaN/inf; the message names the step.
        The state of that step is not saved: the last checkpoint stays good.
    """
    from tqdm.auto import tqdm

    ckpt = Checkpointer(checkpoint_dir, save_every=save_every, keep=keep) if checkpoint_dir is not None else None
    if ckpt is not None and resume and ckpt.latest_step() is not None:
        snap = ckpt.restore(None, _snapshot(state, rng, carry))
        state, rng, carry = _from_snapshot(state, snap, carry)
    if mesh is not None:
        state = _replicate(state, mesh)
        if carry is not None:
            carry = _shard_batch(carry, mesh)
    metrics_file = None
    if metrics_path is not None:
        metrics_path = pathlib.Path(metrics_path)
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_file = open(metrics_path, "a", encoding="utf-8")
    history: list = []

    def record(entry: dict) -> None:
        history.append(entry)
        if metrics_file is not None:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()

    def evaluate(step: int) -> None:
        ev = {f"eval_{k}": float(v) for k, v in eval_fn(state).items()}
        record(dict(step=step, **ev))
        if on_eval is not None:
            on_eval(step, ev)

    start = int(state.step)
    interrupted = False
    bar = tqdm(total=num_steps, initial=start, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    step = start
    try:
        while step < num_steps:
            batch = batch_fn(step)
            if mesh is not None:
                batch = _shard_batch(batch, mesh)
            new_state, metrics, new_carry = train_step(state, batch, jax.random.fold_in(rng, step), carry)
            loss = float(metrics["loss"])
            state, carry = new_state, new_carry  # unchanged by the step if the loss was not finite
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"the loss became {loss} at step {step}; training stopped before applying that update "
                    "(the last checkpoint is intact). Lower the learning rate or the clipping norm, or check the data."
                )
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if step % log_every == 0 or step == num_steps:
                record(dict(step=step, time_s=time.perf_counter() - t0, **_scalars(metrics)))
            if ckpt is not None:
                ckpt.save(step, _snapshot(state, rng, carry))
            if eval_fn is not None and eval_every and step % eval_every == 0 and step < num_steps:
                evaluate(step)
    except KeyboardInterrupt:
        interrupted = True
        bar.write(f"interrupted at step {step}: saving and stopping")
    except BaseException:
        if metrics_file is not None:
            metrics_file.close()
        raise
    finally:
        bar.close()
        if ckpt is not None and step > start:
            ckpt.save(step, _snapshot(state, rng, carry), force=True)
        if ckpt is not None:
            ckpt.close()
    try:
        if eval_fn is not None and not interrupted:
            evaluate(step)
    finally:
        if metrics_file is not None:
            metrics_file.close()
    return FitResult(state, carry, history, interrupted)
