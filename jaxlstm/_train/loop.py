"""The loop: :func:`fit` drives the steps and hands each concern to its part.

Each step: read the batch (split over the mesh), run the step, check it is
finite, add its metrics to the logging window, write a record when one is due,
save a checkpoint when one is due, evaluate when one is due, and agree with the
other processes whether to stop. What a checkpoint holds (state, key, carried
state, logging window, best evaluation) is what makes a resumed run equal an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from . import parallel
from .checkpoints import Checkpointer, first_line, from_snapshot, snapshot
from .evaluation import Best, Schedule, check_patience
from .records import Progress, Records, Window
from .steps import TrainState
from .stopping import StopRequest


class NonFiniteLossError(FloatingPointError):
    """Training stopped because an update was not finite (loss, gradient norm, parameters or optimizer state)."""


class FitResult(NamedTuple):
    state: TrainState
    carry: Any
    history: list  # dicts: {"step", "loss", ...} and {"step", "eval_...": ...}
    interrupted: bool
    early_stopped: bool = False  # ``patience`` evaluations passed without a better ``best_metric``
    best: dict | None = None  # {"step", "value"} of the best evaluation so far (with ``best_metric``)


def _alive(tree) -> bool:
    """False when a buffer of ``tree`` was donated to a step (the state is then unusable)."""
    return not any(getattr(a, "is_deleted", lambda: False)() for a in jax.tree.leaves(tree))


def _scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()}


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
    process_local_batches: bool = False,
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
        ``<checkpoint_dir>.damaged/``). ``resume=False`` with checkpoints
        already there is a ``ValueError`` (the runs would mix).
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
      mesh: a mesh with a ``"data"`` axis (:func:`data_mesh`): batches are
        split over it and the state replicated (data-parallel training), on
        the devices of one process or, after ``jax.distributed.initialize``,
        of every process (the same program runs in each; a mesh is then
        required). In several processes only process 0 writes the metrics
        file, TensorBoard events, notes and the bar; every process takes part
        in each checkpoint (orbax), a signal to any one of them stops them all
        after the same step, and a process that dies ends the others at their
        next step with :class:`PartnerLost`. A checkpoint does not depend on
        the number of processes or devices that wrote it. A mesh with
        Explicit axes (``jax.make_mesh``'s default) is used with Auto ones:
        ``fit`` shards the batch and XLA propagates it through any model.
      process_local_batches: ``batch_fn(step)`` returns this process's rows of
        the global batch (its share, in process order), for data that one host
        cannot hold (e.g. a grain source sharded by ``jax.process_index()``).
        Default: ``batch_fn(step)`` is the global batch, computed alike in
        every process, each keeping the rows its devices hold.
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
      PartnerLost: in several processes, another process of the run died or
        was stopped at once; the checkpoints written before are intact.

    Any other error (from ``batch_fn``, ``eval_fn``, a callback) first saves
    the state reached, where there is a ``checkpoint_dir`` and the state is
    intact (one process), and carries :class:`FitResult` as its
    ``fit_result`` attribute, so the trained state is never lost with it.
    """
    if isinstance(batch_fn, type):
        raise TypeError(
            f"batch_fn must be a function batch_fn(step) -> batch, or a data source with len() and indexing; "
            f"received the class {batch_fn.__name__} itself (pass an instance, or a function of the step)."
        )
    if not callable(batch_fn):
        batch_fn = batches_from(batch_fn)
    check_patience(patience)
    if (patience is not None or best_dir is not None) and eval_fn is None:
        raise ValueError("patience and best_dir follow an evaluation: give eval_fn (and eval_every) too.")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be a positive int (steps per training record); received {log_every!r}.")
    if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 0:
        raise ValueError(f"save_every must be an int >= 0 (0: only at the end); received {save_every!r}.")
    if checkpoint_dir is not None and best_dir is not None:
        a, b = pathlib.Path(checkpoint_dir).absolute(), pathlib.Path(best_dir).absolute()
        if a == b or a in b.parents or b in a.parents:
            raise ValueError(
                f"best_dir ({b}) and checkpoint_dir ({a}) must be separate folders, neither inside the other: "
                "each keeps its own checkpoints and removes the ones it no longer keeps."
            )
    parallel.check_mesh(mesh)
    mesh = None if mesh is None else parallel.auto_axes(mesh)
    run = _Run(
        state,
        train_step,
        batch_fn,
        num_steps=num_steps,
        rng=rng,
        carry=carry,
        schedule=Schedule(eval_fn, eval_every, num_steps),
        mesh=mesh,
        process_local=process_local_batches,
        log_every=log_every,
        progress=Progress(num_steps, enabled=progress, metric=progress_metric),
        best=Best(best_metric, patience) if (best_dir is not None or patience is not None) else None,
    )
    p = run.progress
    note: Callable[[str], Any] = p.write if log is None else parallel.on_writer(p.outside(log))  # type: ignore[assignment]
    run.note = note
    run.on_eval = p.outside(on_eval)
    outer = StopRequest.current()
    run.stop = outer if outer is not None else StopRequest(note)
    try:
        with run.stop if handle_signals and outer is None else contextlib.nullcontext():
            run.open(
                checkpoint_dir, save_every, keep, resume, best_dir, metrics_path, tensorboard_dir, p.outside(on_record)
            )
            run.train()
    except KeyboardInterrupt:
        if not run.after_keyboard_interrupt():
            raise
    except NonFiniteLossError:
        run.save_intact()
        raise
    except Exception as e:
        if parallel.partner_lost(e):
            raise parallel.PartnerLost(
                f"process {jax.process_index()} lost another process of the run at step {run.step} "
                f"({first_line(e, 120)}); the checkpoints written before are kept."
            ) from None
        run.save_intact()
        e.fit_result = run.result()  # type: ignore[attr-defined]
        raise
    finally:
        run.close()
    return run.result()


class _Run:
    """One call of :func:`fit`: its state, its parts, and the step loop."""

    note: Callable[[str], Any]
    on_eval: Callable | None
    stop: StopRequest

    def __init__(self, state, train_step, batch_fn, *, num_steps, rng, carry, schedule, mesh, process_local,
                 log_every, progress, best):  # fmt: skip
        self.state, self.rng, self.carry = state, rng, carry
        self.train_step, self.batch_fn = train_step, batch_fn
        self.num_steps = num_steps
        self.schedule = schedule
        self.mesh = mesh
        self.process_local = process_local
        self.log_every = log_every
        self.progress = progress
        self.best = best
        self.window = Window()
        self.records: Records | None = None
        self.ckpt: Checkpointer | None = None
        self.best_ckpt: Checkpointer | None = None
        self.step = self.start = int(state.step)
        self.saving = False
        self.interrupted = self.early_stopped = False
        if mesh is not None:
            self.state = parallel.replicate(state, mesh)
            self.rng = parallel.replicate(rng, mesh)
            if carry is not None:
                self.carry = parallel.shard_batch(carry, mesh)

    # -------------------------------------------------------------- setting up

    def open(self, checkpoint_dir, save_every, keep, resume, best_dir, metrics_path, tensorboard_dir, on_record):
        if checkpoint_dir is not None:
            self.ckpt = Checkpointer(checkpoint_dir, save_every=save_every, keep=keep)
            if self.ckpt.all_steps():
                if not resume:
                    raise ValueError(
                        f"resume=False, but {self.ckpt.directory} holds checkpoints {self.ckpt.all_steps()} of an "
                        "earlier run, which this one would mix with its own: pass resume=True to continue that run, "
                        "or another (or an emptied) checkpoint_dir."
                    )
                self._restore()
        if best_dir is not None:
            self.best_ckpt = Checkpointer(best_dir, keep=1)
        self.step = self.start = int(self.state.step)
        self.progress.start(self.num_steps, self.start)
        self.records = Records(
            start=self.start, metrics_path=metrics_path, tensorboard_dir=tensorboard_dir, on_record=on_record
        )

    def _restore(self) -> None:
        ckpt = self.ckpt
        assert ckpt is not None
        restored_step, snap = ckpt.restore(None, self._snapshot(), on_fallback=self.note)
        if ckpt.skipped:
            aside = ckpt.directory.with_name(ckpt.directory.name + ".damaged")
            ckpt.set_aside(ckpt.skipped, aside)
            self.note(f"resuming from checkpoint {restored_step}; the damaged ones were moved to {aside}")
        self.state, self.rng, self.carry = from_snapshot(self.state, snap, self.carry)
        extra = ckpt.extra if isinstance(ckpt.extra, dict) else {}
        self.window = Window(extra.get("window"))
        if self.best is not None:
            self.best = Best(self.best.metric, self.best.patience, extra.get("best"))

    def _snapshot(self) -> dict:
        snap = snapshot(self.state, self.rng, self.carry)
        if self.mesh is not None:  # the step counter and key as global arrays too (a multi-process save needs them)
            snap = dict(
                snap, step=parallel.replicate(snap["step"], self.mesh), rng=parallel.replicate(snap["rng"], self.mesh)
            )
        return snap

    # -------------------------------------------------------------- saving

    def _extra(self) -> dict:
        best = self.best.state() if self.best is not None else {"value": None, "step": None, "since": 0}
        return {"window": self.window.state(), "best": best}

    def save(self, force: bool) -> None:
        if self.ckpt is None:
            return
        self.saving = True
        self.ckpt.save(self.step, self._snapshot(), force=force, extra=self._extra())
        self.saving = False

    def save_intact(self) -> None:
        """After an error: save the state reached, where there is a checkpoint folder and the state is intact.

        In several processes a save needs them all, and after an error in one they are
        not all here: the checkpoints already written stand.
        """
        if self.ckpt is None or self.step <= self.start or self.saving or not _alive(self.state):
            return
        if parallel.processes() > 1:
            return
        with contextlib.suppress(Exception):  # the error being raised is the one to report
            self.save(force=True)

    # -------------------------------------------------------------- evaluating

    def evaluate(self, at: int) -> None:
        assert self.records is not None
        ev = self.schedule.run(self.state)
        self.records.write(dict(step=at, **ev))
        if self.on_eval is not None:
            self.on_eval(at, ev)
        if self.best is None:
            return
        improved, stop = self.best.observe(at, ev)
        if improved and self.best_ckpt is not None:  # keep=1: the earlier best goes once this one is complete
            self.best_ckpt.save(at, self._snapshot(), force=True)
        if stop and at < self.num_steps:
            self.early_stopped = True
            self.note(
                f"early stop at step {at}: {self.best.metric} has not improved on {self.best.value:.4f} "
                f"(step {self.best.step}) for {self.best.patience} evaluations"
            )

    def _due(self, at: int) -> bool:
        assert self.records is not None
        return self.schedule.due(at, self.records.evaluated)

    # -------------------------------------------------------------- the loop

    def train(self) -> None:
        stop = self.stop
        # an evaluation that a stop cut off right after the checkpoint of its step
        if 0 < self.start < self.num_steps and self._due(self.start) and stop.agree() is None:
            self.evaluate(self.start)
        t0 = time.perf_counter()
        while self.step < self.num_steps and not self.early_stopped:
            if stop.agree() is not None:  # the same answer in every process
                break
            batch = self.batch_fn(self.step)
            if self.mesh is not None:
                batch = parallel.shard_batch(batch, self.mesh, process_local=self.process_local)
            # A second signal waits for the step and its bookkeeping (at most one step): cut in between,
            # the saved state would hold a step whose metrics the logging window lacks.
            with stop.deferred():
                self._one_step(batch, t0)
            self.save(force=False)
            if self.step < self.num_steps and self._due(self.step):
                self.evaluate(self.step)
        self.interrupted = stop.agree() is not None
        if self.interrupted:
            self.note(f"stopped at step {self.step} by {signal.Signals(stop.signal or signal.SIGINT).name}")
        if self.step > self.start:
            self.save(force=True)
        if not self.interrupted and not self.early_stopped and self._due(self.step):
            self.evaluate(self.step)

    def _one_step(self, batch, t0: float) -> None:
        assert self.records is not None
        step = self.step
        # the state is donated to the step: bind the new one at once (see _alive for the rest)
        self.state, metrics, self.carry = self.train_step(
            self.state, batch, jax.random.fold_in(self.rng, step), self.carry
        )
        finite = bool(metrics.pop("finite", True))
        if not finite:
            raise NonFiniteLossError(
                f"update {step + 1} (from batch {step}) was not finite (loss {float(metrics['loss'])}, gradient "
                f"norm {float(metrics['grad_norm'])}): it was not applied, and training stopped with the state "
                f"after step {step}. Lower the learning rate or the clipping norm, or check the data (a resumed "
                "run would meet the same batch again)."
            )
        self.step = step + 1
        self.window.add(_scalars(metrics))
        self.progress.step(self.window)
        if self.step % self.log_every == 0 or self.step == self.num_steps:
            means = self.window.close()
            self.records.write(dict(step=self.step, time_s=time.perf_counter() - t0, **means))

    # -------------------------------------------------------------- ending

    def after_keyboard_interrupt(self) -> bool:
        """A Ctrl-C raised as an exception (a second signal, or raised by user code): save if it is safe.

        Returns whether the state was saved (``fit`` then returns it, marked interrupted) rather
        than the interrupt going on.
        """
        self.interrupted = True
        if self.saving or not _alive(self.state) or parallel.processes() > 1:
            # it cut a save short (that checkpoint stays an unfinished temporary folder, removed on the next
            # start), or it arrived while the state was donated to the step in flight, or the other processes
            # are not here to save with this one: nothing more is saved
            if self.ckpt is not None:
                self.note(
                    f"interrupted at step {self.step}: the last complete checkpoint ({self.ckpt.latest_step()}) is kept"
                )
            return False
        if self.ckpt is not None and self.step > self.start:
            self.save(force=True)
            self.note(f"interrupted at step {self.step}: saved")
        return True

    def result(self) -> FitResult:
        history = self.records.history if self.records is not None else []
        summary = self.best.summary() if self.best is not None else None
        state = self.state if _alive(self.state) else None
        return FitResult(state, self.carry, history, self.interrupted, self.early_stopped, summary)  # type: ignore[arg-type]

    def close(self) -> None:
        self.progress.close()
        for c in (self.ckpt, self.best_ckpt):
            if c is not None:
                c.close()
        if self.records is not None:
            self.records.close()
