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
from collections.abc import Callable, Mapping, Sequence
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


def _digest(tree) -> str:
    """SHA-256 over every leaf's shape and values, in tree order: detects any corruption of the data.

    Values are widened first (floats to float64, integers to int64), exactly, so
    that a checkpoint restored into a wider dtype than it was saved in still
    matches its digest.
    """
    h = hashlib.sha256()
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
        self._open()

    def _open(self) -> None:
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

    def save(self, step: int, tree, *, force: bool = False) -> bool:
        """Save ``tree`` as step ``step`` if it is due (or ``force``); returns whether it saved."""
        if not force and (not self.save_every or step % self.save_every):
            return False
        if step in self._manager.all_steps():
            return False
        if not _all_finite(tree):
            raise ValueError(f"refusing to save step {step}: it holds NaN or infinite values.")
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(tree),
            meta=self._ocp.args.JsonSave({"step": int(step), "sha256": _digest(tree)}),
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
        if not isinstance(meta, Mapping) or meta.get("sha256") != _digest(tree):
            raise _Corrupt("its data does not match the checksum written with it")
        if not _all_finite(tree):
            raise _Corrupt("it holds NaN or infinite values")
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
    ``KeyboardInterrupt`` at once (for a user who cannot wait); :func:`fit`
    then saves the state only if it is intact, and the earlier checkpoints
    stay as they were in any case. Outside the main thread, where Python
    cannot install handlers, it does nothing.
    """

    def __init__(self, notify: Callable[[str], None] | None = None):
        self.signal: int | None = None
        self._notify = notify
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.signal is not None:
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
    batch_fn: Callable[[int], Any],
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
        a checkpoint is also written at the end and when stopped by a signal.
      resume: continue from the newest intact checkpoint in ``checkpoint_dir``
        if any (a damaged newer one is reported through ``log`` and moved to
        ``<checkpoint_dir>.damaged/``).
      metrics_path: JSON-lines file, appended with a record every ``log_every``
        steps and at each evaluation. On resume, rows past the restored step
        are removed first, and an evaluation due at that step that a stop
        interrupted is run again, so the file equals an uninterrupted run's
        (up to the ``time_s`` column).
      progress: show a tqdm progress bar with the live loss.
      mesh: a mesh with a ``"data"`` axis: batches are sharded over it and the
        state replicated (data-parallel training).
      on_eval: called as ``on_eval(step, eval_metrics)`` after each evaluation.
      log: where one-line notes go (default: the progress bar's ``write``).
      handle_signals: in the main thread, SIGINT (Ctrl-C) and SIGTERM stop
        training after the step in flight, which is saved (see
        :class:`StopRequest`); ``FitResult.interrupted`` is then true.

    Returns:
      :class:`FitResult` ``(state, carry, history, interrupted)``.

    Raises:
      NonFiniteLossError: an update was not finite (loss, gradient norm,
        parameters or optimizer state); the message names the step. That
        update is not applied and never saved: the state of the step before
        it is saved, and every checkpoint holds finite values.
      CheckpointError: resuming found checkpoints but none intact, or ones of
        another model.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=num_steps, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    note = log if log is not None else bar.write
    outer = StopRequest.current()
    stop = outer if outer is not None else StopRequest(note)
    history: list = []
    metrics_file = None
    ckpt = None
    interrupted = False
    step = start = int(state.step)
    saving = False

    def save(at: int, force: bool) -> None:
        nonlocal saving
        assert ckpt is not None
        saving = True
        ckpt.save(at, snapshot(state, rng, carry), force=force)
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
                write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
                evaluated = {r["step"] for r in rows if any(k.startswith("eval_") for k in r)}
                metrics_file = open(metrics_path, "a", encoding="utf-8")

            def record(entry: dict) -> None:
                history.append(entry)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(entry) + "\n")
                    metrics_file.flush()

            def evaluate(at: int) -> None:
                assert eval_fn is not None
                ev = {f"eval_{k}": float(v) for k, v in eval_fn(state).items()}
                record(dict(step=at, **ev))
                evaluated.add(at)
                if on_eval is not None:
                    on_eval(at, ev)

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
            while step < num_steps and stop.signal is None:
                batch = batch_fn(step)
                if mesh is not None:
                    batch = _shard_batch(batch, mesh)
                # the state is donated to the step: bind the new one at once (see _alive for the rest)
                state, metrics, carry = train_step(state, batch, jax.random.fold_in(rng, step), carry)
                finite = bool(metrics.pop("finite", True))
                loss = float(metrics["loss"])
                if not finite:
                    raise NonFiniteLossError(
                        f"update {step + 1} (from batch {step}) was not finite (loss {loss}, gradient norm "
                        f"{float(metrics['grad_norm'])}): it was not applied, and training stopped with the state "
                        f"after step {step}. Lower the learning rate or the clipping norm, or check the data "
                        "(a resumed run would meet the same batch again)."
                    )
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if step % log_every == 0 or step == num_steps:
                    record(dict(step=step, time_s=time.perf_counter() - t0, **_scalars(metrics)))
                if ckpt is not None:
                    save(step, force=False)
                if step < num_steps and eval_due(step):
                    evaluate(step)
            interrupted = stop.signal is not None
            if stop.signal is not None:
                note(f"stopped at step {step} by {signal.Signals(stop.signal).name}")
            if ckpt is not None and step > start:
                save(step, force=True)
            if not interrupted and eval_due(step):
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
        if ckpt is not None:
            ckpt.close()
        if metrics_file is not None:
            metrics_file.close()
    return FitResult(state, carry, history, interrupted)
