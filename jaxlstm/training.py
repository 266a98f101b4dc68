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
  (keep the last K, each with a checksum; a damaged one is skipped on
  resume), bit-for-bit resume, a clean stop on Ctrl-C or SIGTERM after
  saving the step in flight, and a guard that stops on a non-finite update
  (loss, gradients or parameters) naming the step;
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

import contextlib
import hashlib
import json
import os
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state as flax_train_state

from .losses import masked_mse, sequence_cross_entropy, sequence_mask, to_bits

TrainState = flax_train_state.TrainState

__all__ = [
    "TrainState",
    "FitResult",
    "NonFiniteLossError",
    "CheckpointError",
    "StopRequest",
    "snapshot",
    "from_snapshot",
    "read_metrics",
    "write_text_atomic",
    "json_line",
    "batches_from",
    "nnx_train_state",
    "nnx_update",
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


# ------------------------------------------------------------------ optimizer and steps


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
      holds ``loss``, ``grad_norm`` and ``finite`` too; ``carry`` leaves with
      its gradient stopped, so the next step starts a new truncation window.
      When the loss, the gradient norm or any updated parameter or optimizer
      value is not finite, the update is skipped (state and carry come back
      unchanged) and ``finite`` is false; :func:`fit` then stops.
    """

    def step(state: TrainState, batch, rng, carry):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (metrics, new_carry)), grads = grad_fn(state.params, state, batch, rng, carry)
        # a non-finite loss leaves state and carry as they were (the inputs are donated,
        # so this is how the last good values survive for the NaN guard to save)
        # finite loss *and* gradients *and* updated params and optimizer state: a NaN
        # that reaches only the gradients (or a NaN learning rate) is caught here too
        grad_norm = optax.tree.norm(grads)
        updated = state.apply_gradients(grads=grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _tree_finite((updated.params, updated.opt_state))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = keep(updated, state)
        if carry is not None:
            new_carry = keep(new_carry, carry)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=ok)
        return new_state, metrics, jax.lax.stop_gradient(new_carry)

    return jax.jit(step, donate_argnums=(0,) if donate else ())


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


def _tree_finite(tree) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(a), jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


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


class CheckpointError(Exception):
    """No checkpoint could be restored: none is there, none is intact, or they fit another model."""


def _digest(tree, extra: Any = None) -> str:
    """SHA-256 over every leaf's shape and values, in tree order (and ``extra``): detects any corruption.

    Values are widened first (floats to float64, integers to int64), exactly, so
    that a checkpoint restored into a wider dtype than it was saved in still
    matches its digest.
    """
    h = hashlib.sha256()
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True).encode())
    for leaf in jax.tree.leaves(tree):
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16":
            a = a.astype(np.float64)
        elif np.issubdtype(a.dtype, np.integer):
            a = a.astype(np.int64)
        h.update(repr(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _all_finite(tree) -> bool:
    return all(
        bool(np.isfinite(np.asarray(a)).all())
        for a in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(a), jnp.inexact)
    )


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet_absl(active: bool):
    """absl (orbax's logger) above warnings while active."""
    import logging

    logger = logging.getLogger("absl")
    level = logger.level
    if active:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class Checkpointer:
    """orbax-checkpoint behind three calls: ``save``, ``latest_step``, ``restore``; checkpoints you can trust.

    Saves every ``save_every`` steps (and whenever forced), keeps the last
    ``keep``. What is saved is a pytree of arrays; :func:`fit` stores the train
    state (params, optimizer state, step), the rng and the carried state.

    * Each checkpoint is written to a temporary folder and renamed when
      complete (orbax), so a process killed while saving leaves the earlier
      checkpoints as they were; leftovers are removed on the next start.
    * Each checkpoint carries a SHA-256 of its arrays. :meth:`restore` checks
      it and falls back to the newest checkpoint that is intact and finite,
      reporting what it skipped through ``on_fallback``.
    * Non-finite values are never saved (``ValueError``).
    """

    def __init__(self, directory, *, save_every: int = 0, keep: int = 3, read_only: bool = False):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        self.save_every = save_every
        self.keep = keep
        self.read_only = read_only
        self.skipped: list[int] = []  # the damaged checkpoints the last restore() passed over
        self.extra: Any = None  # the ``extra`` saved with the checkpoint the last restore() returned
        self._open()

    def _open(self) -> None:
        with _quiet_absl(self.read_only):  # orbax warns that a read-only directory is read only
            self._open_manager()

    def _open_manager(self) -> None:
        ocp = self._ocp
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if self.read_only else self.keep,
            save_interval_steps=0 if self.read_only else 1,
            enable_async_checkpointing=False,
            create=not self.read_only,
            read_only=self.read_only,
            cleanup_tmp_directories=not self.read_only,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def save(self, step: int, tree, *, force: bool = False, extra: Any = None) -> bool:
        """Save ``tree`` as step ``step`` if it is due (or ``force``); returns whether it saved.

        ``extra``: JSON-serialisable values saved with it (and covered by its checksum).
        """
        if not force and (not self.save_every or step % self.save_every):
            return False
        if step in self._manager.all_steps():
            return False
        if not _all_finite(tree):
            raise ValueError(f"refusing to save step {step}: it holds NaN or infinite values.")
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(tree),
            meta=self._ocp.args.JsonSave({"step": int(step), "sha256": _digest(tree, extra), "extra": extra}),
        )
        saved = self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        return bool(saved)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def _check_shapes(self, step: int, template) -> None:
        meta = self._manager.item_metadata(step)["state"]
        meta = getattr(meta, "tree", meta)
        saved = sorted(tuple(m.shape) for m in jax.tree.leaves(meta) if hasattr(m, "shape"))
        wanted = sorted(tuple(np.shape(a)) for a in jax.tree.leaves(template))
        if not saved:
            raise _Corrupt("its metadata lists no arrays")
        if saved != wanted:
            diffs = [f"{a} vs {b}" for a, b in zip(saved, wanted) if a != b][:2]
            raise _Mismatch(
                f"checkpoint {step} holds {len(saved)} arrays of other shapes than this model's {len(wanted)} "
                f"(saved vs expected: {', '.join(diffs) or 'a different number of arrays'})"
            )

    def _restore_one(self, step: int, template):
        try:
            self._check_shapes(step, template)
        except _Mismatch:
            raise
        except Exception as e:  # unreadable metadata: a damaged checkpoint
            raise _Corrupt(f"its metadata cannot be read ({_first_line(e, 80)})") from None
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), template)
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardRestore(abstract), meta=self._ocp.args.JsonRestore()
        )
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:
            raise _Corrupt(f"its data cannot be read ({_first_line(e, 80)})") from None
        tree, meta = restored["state"], restored["meta"]
        if not isinstance(meta, Mapping) or meta.get("sha256") != _digest(tree, meta.get("extra")):
            raise _Corrupt("its data does not match the checksum written with it")
        if not _all_finite(tree):
            raise _Corrupt("it holds NaN or infinite values")
        self.extra = meta.get("extra")
        return tree

    def restore(self, step: int | None, template, *, on_fallback: Callable[[str], None] | None = None):
        """The checkpoint at ``step``, or (``step=None``) the newest intact one.

        Args:
          step: a step number, or ``None`` for the newest checkpoint that
            restores, matches its checksum and holds only finite values.
          template: a pytree with the shapes and dtypes to restore into.
          on_fallback: called with a one-line message for each checkpoint
            that was skipped as damaged.

        Returns:
          ``(step, tree)``.

        Raises:
          CheckpointError: no checkpoint, none intact, or they hold arrays of
            other shapes than ``template`` (a different model).
        """
        steps = self.all_steps()
        if step is not None:
            steps = [s for s in steps if s == step]
        if not steps:
            where = f"step {step} in " if step is not None else ""
            raise CheckpointError(f"no checkpoint {where}{self.directory}.")
        problems = []
        self.skipped = []
        for s in reversed(steps):
            try:
                tree = self._restore_one(s, template)
            except _Mismatch as e:
                raise CheckpointError(f"{e}: it was written by another model.") from None
            except _Corrupt as e:
                problems.append(f"checkpoint {s} is damaged: {e}")
                self.skipped.append(s)
                if on_fallback is not None:
                    on_fallback(f"checkpoint {s} is damaged ({e}); trying an earlier one")
                continue
            return s, tree
        raise CheckpointError(f"no intact checkpoint in {self.directory}: " + "; ".join(problems) + ".")

    def set_aside(self, steps: Sequence[int], where) -> None:
        """Move damaged checkpoints out of the way (to ``where``) so that their steps can be saved again."""
        where = pathlib.Path(where)
        where.mkdir(parents=True, exist_ok=True)
        for s in steps:
            src = self.directory / str(s)
            if src.exists():
                dst = where / str(s)
                k = 1
                while dst.exists():
                    dst, k = where / f"{s}.{k}", k + 1
                os.replace(src, dst)
        self._manager.close()
        self._open()

    def close(self) -> None:
        self._manager.close()


class _Corrupt(Exception):
    pass


class _Mismatch(Exception):
    pass


# ------------------------------------------------------------------ stopping on signals


class StopRequest:
    """SIGINT and SIGTERM turned into a request to stop at the next safe point.

    The first signal sets :attr:`signal` and returns: the step in flight
    finishes, is saved, and the loop stops. A second signal raises
    ``KeyboardInterrupt`` at once (for a user who cannot wait), except inside
    a :meth:`deferred` block, which it ends first (:func:`fit` runs each step
    and its bookkeeping in one); :func:`fit` then saves the state only if it
    is intact, and the earlier checkpoints stay as they were in any case.
    Outside the main thread, where Python cannot install handlers, it does
    nothing.
    """

    def __init__(self, notify: Callable[[str], None] | None = None):
        self.signal: int | None = None
        self._notify = notify
        self._old: dict = {}
        self._deferring = 0
        self._pending = False

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block that a second signal does not cut: it raises ``KeyboardInterrupt`` when the block ends.

        :func:`fit` runs a step and its bookkeeping (step count, logging window,
        records) in one, so that what it saves after a second Ctrl-C is
        consistent: a step's metrics are counted if and only if its state is.
        """
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self._pending and not self._deferring:
            self._pending = False
            raise KeyboardInterrupt

    def _handle(self, signum, frame):
        if self.signal is not None:
            if self._deferring:
                self._pending = True
                return
            raise KeyboardInterrupt
        self.signal = signum
        if self._notify is not None:
            name = signal.Signals(signum).name
            self._notify(
                f"{name} received: stopping after the current step and saving it (send it again to stop at once)"
            )

    _active: StopRequest | None = None

    @classmethod
    def current(cls) -> StopRequest | None:
        """The request installed by an enclosing ``with StopRequest()``, if any (main thread)."""
        return cls._active

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._outer, StopRequest._active = StopRequest._active, self
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not signal.SIG_IGN:  # a signal the process ignores (nohup) stays ignored
                    self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        if threading.current_thread() is threading.main_thread():
            StopRequest._active = self._outer
        self._old.clear()


# ------------------------------------------------------------------ the loop


class NonFiniteLossError(FloatingPointError):
    """Training stopped because an update was not finite (loss, gradient norm, parameters or optimizer state)."""


class FitResult(NamedTuple):
    state: TrainState
    carry: Any
    history: list  # dicts: {"step", "loss", ...} and {"step", "eval_...": ...}
    interrupted: bool
    early_stopped: bool = False  # ``patience`` evaluations passed without a better ``best_metric``
    best: dict | None = None  # {"step", "value"} of the best evaluation so far (with ``best_metric``)


def snapshot(state: TrainState, rng, carry) -> dict:
    """What :func:`fit` checkpoints: params, optimizer state, step, rng and carry, as a pytree of arrays."""
    return {
        "train_state": flax.serialization.to_state_dict({"params": state.params, "opt_state": state.opt_state}),
        "step": jnp.asarray(state.step, jnp.int64 if jax.config.read("jax_enable_x64") else jnp.int32),
        "rng": jax.random.key_data(rng),
        "carry": carry,
    }


def from_snapshot(template_state: TrainState, snap: dict, carry_template):
    """``(state, rng, carry)`` from a :func:`snapshot` (restored into ``template_state``'s structure)."""
    restored = flax.serialization.from_state_dict(
        {"params": template_state.params, "opt_state": template_state.opt_state}, snap["train_state"]
    )
    state = template_state.replace(step=int(snap["step"]), params=restored["params"], opt_state=restored["opt_state"])
    carry = snap["carry"] if carry_template is not None else None
    return state, jax.random.wrap_key_data(snap["rng"]), carry


def _alive(tree) -> bool:
    """False when a buffer of ``tree`` was donated to a step (the state is then unusable)."""
    return not any(getattr(a, "is_deleted", lambda: False)() for a in jax.tree.leaves(tree))


def _scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()}


def json_line(entry: dict) -> str:
    """One JSON line that strict parsers accept: NaN and infinities are written as ``null``."""
    clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in entry.items()}
    return json.dumps(clean, allow_nan=False)


def batches_from(source: Any, *, shuffle: bool = False, seed: int = 0) -> Callable[[int], Any]:
    """``batch_fn(step)`` over a random-access source of batches (``len(source)``, ``source[i]``).

    Step ``s`` reads item ``s mod len(source)``: one pass over the source per
    epoch, in order, or with ``shuffle`` in an order drawn from ``(seed,
    epoch)``, so the batch of a step never depends on what ran before it and a
    resumed run reads exactly the batches it would have read. Each item is one
    batch: e.g. a ``grain.MapDataset`` after ``.batch(...)``, or a list of arrays.

    Example:
      >>> import numpy as np
      >>> from jaxlstm.training import batches_from
      >>> batch_fn = batches_from([np.zeros(2), np.ones(2), np.full(2, 2.0)], shuffle=True, seed=1)
      >>> sorted(float(batch_fn(s)[0]) for s in range(3))  # each epoch reads every item once
      [0.0, 1.0, 2.0]
    """
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise TypeError(
            f"a data source needs __len__ and __getitem__ (a list, an array, a grain MapDataset); received "
            f"a {type(source).__name__}. Pass a function batch_fn(step) -> batch otherwise."
        )
    n = len(source)
    if n == 0:
        raise ValueError("the data source is empty: it has no batch for step 0.")
    orders: dict[int, np.ndarray] = {}

    def batch_fn(step: int) -> Any:
        epoch, i = divmod(int(step), n)
        if not shuffle:
            return source[i]
        if epoch not in orders:
            orders.clear()  # one epoch at a time
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        return source[int(orders[epoch][i])]

    return batch_fn


def read_metrics(path, upto: int | None = None) -> list:
    """The rows of a JSON-lines metrics file (with ``step <= upto``); a damaged (e.g. half-written) line is dropped."""
    path = pathlib.Path(path)
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and (upto is None or row["step"] <= upto):
                rows.append(row)
    return rows


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader sees the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fit(
    state: TrainState,
    train_step: Callable,
    batch_fn: Callable[[int], Any] | Any,
    *,
    num_steps: int,
    rng: jax.Array,
    carry: Any = None,
    eval_fn: Callable[[TrainState], dict] | None = None,
    eval_every: int = 0,
    checkpoint_dir=None,
    save_every: int = 0,
    keep: int = 3,
    resume: bool = True,
    metrics_path=None,
    log_every: int = 10,
    progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    on_eval: Callable[[int, dict], None] | None = None,
    log: Callable[[str], None] | None = None,
    handle_signals: bool = True,
    on_record: Callable[[dict], None] | None = None,
    tensorboard_dir=None,
    best_metric: str = "eval_loss",
    best_dir=None,
    patience: int | None = None,
    progress_metric: str = "loss",
) -> FitResult:
    """Train for ``num_steps`` steps (in total, counting steps of a resumed run).

    Args:
      state: a :class:`TrainState` (``TrainState.create(apply_fn=..., params=..., tx=...)``).
      train_step: from :func:`make_train_step`.
      batch_fn: ``batch_fn(step) -> batch``, deterministic in ``step``; or a
        random-access source of batches (``len`` and indexing, e.g. a grain
        ``MapDataset``), read in order through :func:`batches_from`.
      num_steps: the step to stop at.
      rng: base PRNG key; step ``s`` uses ``jax.random.fold_in(rng, s)``.
      carry: initial recurrent state for truncated BPTT (``None``: stateless).
      eval_fn: ``eval_fn(state) -> dict`` of scalars, run every ``eval_every``
        steps and at the end; its values are logged with an ``eval_`` prefix.
      checkpoint_dir: where orbax checkpoints go (``None``: no checkpoints).
      save_every, keep: checkpoint every ``save_every`` steps, keep the last ``keep``;
        a checkpoint is also written at the end and when stopped by a signal.
      resume: continue from the newest intact checkpoint in ``checkpoint_dir``
        if any (a damaged newer one is reported through ``log`` and moved to
        ``<checkpoint_dir>.damaged/``).
      metrics_path: JSON-lines file, appended with a record every ``log_every``
        steps and at each evaluation. A training record holds the mean of
        each metric over the steps since the previous record (the logging
        window), not the last batch's. Non-finite values are written as
        ``null``. On resume, rows past the restored step are removed first,
        and an evaluation due at that step that a stop interrupted is run
        again; the partial logging window is saved with each checkpoint. So
        the file equals an uninterrupted run's (up to the ``time_s`` column).
      progress: show a tqdm progress bar with the mean of ``progress_metric``
        over the current logging window. Notes and the callbacks' output are
        written above the bar, never through it.
      mesh: a mesh with a ``"data"`` axis: batches are sharded over it and the
        state replicated (data-parallel training).
      on_eval: called as ``on_eval(step, eval_metrics)`` after each evaluation.
      log: where one-line notes go (default: the progress bar's ``write``).
      handle_signals: in the main thread, SIGINT (Ctrl-C) and SIGTERM stop
        training after the step in flight, which is saved (see
        :class:`StopRequest`); ``FitResult.interrupted`` is then true.
      on_record: called with each record (dict) as it is written, training
        and evaluation alike.
      tensorboard_dir: also write every record's scalars there as TensorBoard
        events (through ``tensorboardX``, in the ``train`` extra); a resumed
        run discards the events of the steps it repeats.
      best_metric: the evaluation value (lower is better) that ``best_dir``
        and ``patience`` follow.
      best_dir: keep the state of the best evaluation so far as a checkpoint
        there (one, replaced when beaten), beside the latest ones.
      patience: stop after this many evaluations in a row without a better
        ``best_metric`` (early stopping); ``FitResult.early_stopped`` is then
        true. The state at the stop is saved as usual; the best one is in
        ``best_dir``.

    Returns:
      :class:`FitResult` ``(state, carry, history, interrupted, early_stopped, best)``.

    Raises:
      NonFiniteLossError: an update was not finite (loss, gradient norm,
        parameters or optimizer state); the message names the step. That
        update is not applied and never saved: the state of the step before
        it is saved, and every checkpoint holds finite values.
      CheckpointError: resuming found checkpoints but none intact, or ones of
        another model.
    """
    from tqdm import tqdm  # the text bar: it needs no notebook widgets

    if not callable(batch_fn):
        batch_fn = batches_from(batch_fn)
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be a positive int (evaluations without improvement); received {patience!r}.")
    if (patience is not None or best_dir is not None) and eval_fn is None:
        raise ValueError("patience and best_dir follow an evaluation: give eval_fn (and eval_every) too.")
    bar = tqdm(total=num_steps, desc="train", unit="step", disable=not progress, dynamic_ncols=True)

    def outside_bar(fn: Callable | None) -> Callable | None:
        """``fn`` with the bar cleared while it writes (a no-op wrapper without a bar)."""
        if fn is None or not progress:
            return fn

        def wrapped(*args: Any) -> Any:
            with tqdm.external_write_mode():
                return fn(*args)

        return wrapped

    note: Callable[[str], Any] = bar.write if log is None else outside_bar(log)  # type: ignore[assignment]
    on_eval, on_record = outside_bar(on_eval), outside_bar(on_record)
    outer = StopRequest.current()
    stop = outer if outer is not None else StopRequest(note)
    history: list = []
    metrics_file = None
    board = None
    ckpt = best_ckpt = None
    interrupted = early_stopped = False
    step = start = int(state.step)
    saving = False
    window: dict = {"count": 0, "sums": {}}  # the metrics summed since the last training record
    best: dict = {"value": None, "step": None, "since": 0}  # the best evaluation, evaluations since it

    def save(at: int, force: bool) -> None:
        nonlocal saving
        assert ckpt is not None
        saving = True
        ckpt.save(at, snapshot(state, rng, carry), force=force, extra={"window": window, "best": best})
        saving = False

    try:
        with stop if handle_signals and outer is None else contextlib.nullcontext():
            if checkpoint_dir is not None:
                ckpt = Checkpointer(checkpoint_dir, save_every=save_every, keep=keep)
                if resume and ckpt.all_steps():
                    restored_step, snap = ckpt.restore(None, snapshot(state, rng, carry), on_fallback=note)
                    if ckpt.skipped:
                        aside = ckpt.directory.with_name(ckpt.directory.name + ".damaged")
                        ckpt.set_aside(ckpt.skipped, aside)
                        note(f"resuming from checkpoint {restored_step}; the damaged ones were moved to {aside}")
                    state, rng, carry = from_snapshot(state, snap, carry)
                    extra = ckpt.extra if isinstance(ckpt.extra, Mapping) else {}
                    window = extra.get("window") or window
                    best = extra.get("best") or best
            if best_dir is not None:
                best_ckpt = Checkpointer(best_dir, keep=1)
            step = start = int(state.step)
            bar.reset(total=num_steps)
            bar.update(start)
            if mesh is not None:
                state = _replicate(state, mesh)
                if carry is not None:
                    carry = _shard_batch(carry, mesh)
            evaluated: set = set()
            if metrics_path is not None:
                metrics_path = pathlib.Path(metrics_path)
                metrics_path.parent.mkdir(parents=True, exist_ok=True)
                rows = read_metrics(metrics_path, start)
                write_text_atomic(metrics_path, "".join(json_line(r) + "\n" for r in rows))
                evaluated = {r["step"] for r in rows if any(k.startswith("eval_") for k in r)}
                metrics_file = open(metrics_path, "a", encoding="utf-8")
            if tensorboard_dir is not None:
                from tensorboardX import SummaryWriter

                board = SummaryWriter(str(tensorboard_dir), purge_step=start + 1 if start else None)

            def record(entry: dict) -> None:
                history.append(entry)
                if metrics_file is not None:
                    metrics_file.write(json_line(entry) + "\n")
                    metrics_file.flush()
                if board is not None:
                    for k, v in entry.items():
                        if k not in ("step", "time_s") and isinstance(v, (int, float)):
                            board.add_scalar(k, v, entry["step"])
                    board.flush()
                if on_record is not None:
                    on_record(entry)

            def evaluate(at: int) -> None:
                nonlocal early_stopped
                assert eval_fn is not None
                ev = {f"eval_{k}": float(v) for k, v in eval_fn(state).items()}
                record(dict(step=at, **ev))
                evaluated.add(at)
                if on_eval is not None:
                    on_eval(at, ev)
                value = ev.get(best_metric)
                if value is None or (best_dir is None and patience is None):
                    return
                if best["value"] is None or value < best["value"]:
                    best.update(value=value, step=at, since=0)
                    if best_ckpt is not None:  # keep=1: the earlier best goes once this one is complete
                        best_ckpt.save(at, snapshot(state, rng, carry), force=True)
                else:
                    best["since"] += 1
                    if patience is not None and best["since"] >= patience and at < num_steps:
                        early_stopped = True
                        note(
                            f"early stop at step {at}: {best_metric} has not improved on {best['value']:.4f} "
                            f"(step {best['step']}) for {patience} evaluations"
                        )

            def eval_due(at: int) -> bool:
                return (
                    eval_fn is not None
                    and at not in evaluated
                    and (at == num_steps or (bool(eval_every) and at % eval_every == 0 and at > 0))
                )

            # an evaluation that a stop cut off right after the checkpoint of its step
            if start > 0 and start < num_steps and eval_due(start) and stop.signal is None:
                evaluate(start)
            t0 = time.perf_counter()
            while step < num_steps and stop.signal is None and not early_stopped:
                batch = batch_fn(step)
                if mesh is not None:
                    batch = _shard_batch(batch, mesh)
                # A second signal waits for the step and its bookkeeping (at most one step): cut in
                # between, the saved state would hold a step whose metrics the logging window lacks.
                with stop.deferred():
                    # the state is donated to the step: bind the new one at once (see _alive for the rest)
                    state, metrics, carry = train_step(state, batch, jax.random.fold_in(rng, step), carry)
                    finite = bool(metrics.pop("finite", True))
                    loss = float(metrics["loss"])
                    if not finite:
                        raise NonFiniteLossError(
                            f"update {step + 1} (from batch {step}) was not finite (loss {loss}, gradient norm "
                            f"{float(metrics['grad_norm'])}): it was not applied, and training stopped with the "
                            f"state after step {step}. Lower the learning rate or the clipping norm, or check the "
                            "data (a resumed run would meet the same batch again)."
                        )
                    step += 1
                    values = _scalars(metrics)
                    window = {
                        "count": window["count"] + 1,
                        "sums": {k: window["sums"].get(k, 0.0) + v for k, v in values.items()},
                    }
                    bar.update(1)
                    if progress_metric in window["sums"]:
                        bar.set_postfix({progress_metric: f"{window['sums'][progress_metric] / window['count']:.4f}"})
                    if step % log_every == 0 or step == num_steps:
                        n = window["count"]
                        means = {k: v / n for k, v in window["sums"].items()}
                        window = {"count": 0, "sums": {}}
                        record(dict(step=step, time_s=time.perf_counter() - t0, **means))
                if ckpt is not None:
                    save(step, force=False)
                if step < num_steps and eval_due(step):
                    evaluate(step)
            interrupted = stop.signal is not None
            if stop.signal is not None:
                note(f"stopped at step {step} by {signal.Signals(stop.signal).name}")
            if ckpt is not None and step > start:
                save(step, force=True)
            if not interrupted and not early_stopped and eval_due(step):
                evaluate(step)
    except KeyboardInterrupt:
        # a Ctrl-C raised as an exception (a second signal, or raised by user code)
        interrupted = True
        if saving or not _alive(state):
            # it cut a save short (that checkpoint stays an unfinished temporary folder, removed on the next
            # start), or it arrived while the state was donated to the step in flight: nothing more is saved
            if ckpt is not None:
                note(f"interrupted at step {step}: the last complete checkpoint ({ckpt.latest_step()}) is kept")
            raise
        if ckpt is not None and step > start:
            save(step, force=True)
            note(f"interrupted at step {step}: saved")
    except NonFiniteLossError:
        if ckpt is not None and step > start:
            save(step, force=True)
        raise
    finally:
        bar.close()
        for c in (ckpt, best_ckpt):
            if c is not None:
                c.close()
        if metrics_file is not None:
            metrics_file.close()
        if board is not None:
            board.close()
    summary = None if best["value"] is None else {"step": best["step"], "value": best["value"]}
    return FitResult(state, carry, history, interrupted, early_stopped, summary)
