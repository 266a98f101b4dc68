"""The main job: a character-level language model trained with :mod:`jaxlstm.training`.

``jaxlstm train`` and ``jaxlstm generate`` are thin command-line wrappers of
:func:`train` and :func:`generate` here. The job's parts live beside it, one
job each: :mod:`.corpus` (the text, its split and batches), :mod:`.config`
(``config.json``), :mod:`.model` (the model, its loss, evaluation and
sampling), :mod:`.runfolder` (the folder and its lock), :mod:`.plots`; their
public names are re-exported here.

A run folder holds ``config.json`` (everything that defines the run: model,
optimizer and schedule, batch, data identity, seeds, vocabulary),
``checkpoints/`` (orbax, each with a checksum), ``metrics.jsonl``,
``loss.png`` and ``sample.txt``, and a lock file while a process trains in it.
Nothing else in the folder is ever touched: ``--overwrite`` removes only
these names, and only in a folder that holds a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import pathlib
import signal
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import training
from .._train import parallel
from ..linen import CharLM
from .config import (
    Config,
    check_config,
    config_text,
    new_config,
    read_config,
    resume_config,
)
from .corpus import (
    encode,
    held_out_streams,
    load_text,
    load_with_digest,
    resume_text,
    split_text,
    stream_batches,
    training_batches,
    window_batches,
)
from .errors import Interrupted, RunError
from .model import (
    build,
    check_memory,
    check_sampling,
    filter_logits,
    lm_loss,
    make_evaluator,
    sample,
    zero_carry,
)
from .plots import plot_history
from .runfolder import LOCK_NAME, RUN_FILES, RunLock, checkpoint_steps, clean_failed_start, has_run, remove_run_files


class TrainResult(NamedTuple):
    state: training.TrainState
    history: list  # this invocation's metric rows
    stopped_by: int | None  # the signal that stopped training, None when it finished


def train(
    options: dict | Config,
    out,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    mesh: jax.sharding.Mesh | None = None,
):
    """Train (or resume) a character model in ``out``; returns a :class:`TrainResult`.

    ``options`` holds the :class:`Config` fields the user set (a dict; the
    others take their defaults, or on ``resume`` the run's own values), or a
    whole :class:`Config`. ``mesh``: split each batch over its ``"data"`` axis
    (:func:`jaxlstm.training.data_mesh`; required in several processes, where
    every process runs this same call and only process 0 writes the run's
    files and notes).
    """
    if isinstance(options, Config):
        derived = ("text_sha256", "vocab", "schedule_steps")
        options = {k: v for k, v in dataclasses.asdict(options).items() if k not in derived}
    if resume and overwrite:
        raise RunError("--resume continues the run in --out and --overwrite replaces it: give one of them.")
    if not str(out).strip():
        raise RunError("--out is empty: name the run folder (e.g. runs/mine, or . for the current folder).")
    writer = jax.process_index() == 0
    if not writer:
        log = lambda msg: None  # noqa: E731  (process 0 speaks for the run)
    out = pathlib.Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; give a folder for the run.")
    created = not out.exists()
    preexisting = {n for n in RUN_FILES + (LOCK_NAME,) if (out / n).exists()}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create the run folder {out}: {e.strerror}.") from None
    new_run = False
    try:
        # signals only set a flag from here on: start-up checks it before training, fit() between steps;
        # process 0 holds the lock for all the processes of the run
        lock = RunLock(out) if writer else contextlib.nullcontext()
        with lock, training.StopRequest(log) as stop:
            new_run = not resume
            return _train_locked(
                options, out, stop, resume=resume, overwrite=overwrite, progress=progress, log=log, mesh=mesh
            )
    except BaseException:
        if writer and new_run and not checkpoint_steps(out):
            clean_failed_start(out, created, preexisting)
        raise


def _train_locked(options: dict, out: pathlib.Path, stop, *, resume: bool, overwrite: bool, progress: bool, log, mesh):
    writer = jax.process_index() == 0
    run_here = has_run(out)
    if run_here and not (resume or overwrite):
        raise RunError(
            f"{out} already holds a run. Pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out."
        )
    if resume and not run_here:
        raise RunError(f"--resume: {out} holds no run to continue (no config.json).")
    if not run_here:
        theirs = [n for n in RUN_FILES if (out / n).exists() or (out / n).is_symlink()]
        if theirs:
            raise RunError(
                f"{out} holds no run but files named like a run's ({', '.join(theirs)}), which a new run would "
                "overwrite; choose another --out (jaxlstm never replaces files it did not write)."
            )
    # every option and file is checked before anything in the folder changes
    if resume:
        cfg = resume_config(read_config(out), options, (checkpoint_steps(out) or [0])[-1], log)
        text = resume_text(cfg, options.get("text"))
    else:
        cfg = new_config(options)
        text, digest = load_with_digest(cfg.text)
        cfg.text = None if cfg.text is None else str(pathlib.Path(cfg.text).absolute())
        cfg.text_sha256 = digest
        cfg.vocab = "".join(sorted(set(text)))
        cfg.schedule_steps = cfg.steps
    train_text, valid_text = split_text(text, cfg.seq_len)
    check_memory(cfg)
    devices = 1 if mesh is None else mesh.shape["data"]
    if cfg.batch_size % devices:
        raise RunError(
            f"--batch-size {cfg.batch_size} cannot be split over {devices} devices; use a multiple of {devices} "
            "(or fewer devices: --cpu-devices)."
        )
    parallel.barrier("jaxlstm-run-checked")  # no process changes the folder before every one has read it
    if writer:
        if overwrite and run_here:
            remove_run_files(out)
            log(f"--overwrite: removed the previous run's files from {out}")
        training.write_text_atomic(out / "config.json", config_text(cfg))
    parallel.barrier("jaxlstm-config-written")
    if devices > 1:
        where = f"{jax.process_count()} processes, " if jax.process_count() > 1 else ""
        log(f"devices: each batch split over {where}{devices} {jax.devices()[0].platform.upper()} devices")
    log(
        f"corpus: {len(text):,} characters ({'embedded Shakespeare' if cfg.text is None else cfg.text}), "
        f"vocabulary {len(cfg.vocab)}; training on {len(train_text):,}, holding out the last {len(valid_text):,}"
    )
    model, state = _state(cfg)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params))
    cell = "learned output map tanh(W_o c + b_o)" if cfg.output_transform else "classic cell, tanh(c)"
    log(
        f"model: Embed({cfg.embed_dim}) -> LSTM({cfg.hidden_size} x {cfg.num_layers}, {cell}) -> Dense; "
        f"{n_params:,} parameters"
    )
    batches = training_batches(cfg, encode(train_text, cfg.vocab))
    reads = (
        f"{cfg.batch_size} contiguous streams, the state carried from step to step"
        if cfg.streams
        else f"{cfg.batch_size} random windows, each from a zero state"
    )
    log(f"batches: {reads}; {cfg.seq_len} characters per step")
    evaluator = make_evaluator(model, encode(valid_text, cfg.vocab), cfg.seq_len)

    last: dict = {}  # the latest training and held-out figures, for the plain lines

    def on_eval(step, ev):
        if progress:  # written above the bar
            log(f"step {step}: held-out {ev['eval_bits_per_char']:.3f} bits/char")

    def on_record(row):
        # without the bar: one plain line per logging interval with the training and held-out figures
        # (at a step that is evaluated, the line waits for the evaluation)
        if progress:
            return
        step = row["step"]
        if "eval_bits_per_char" in row:
            last["eval"] = (step, row["eval_bits_per_char"])
            train = f"; train {last['train'][1]:.3f}" if "train" in last else ""
            log(f"step {step}: held-out {row['eval_bits_per_char']:.3f} bits/char{train}")
        elif "bits_per_char" in row:
            last["train"] = (step, row["bits_per_char"])
            if step % cfg.eval_every == 0 or step == cfg.steps:
                return
            held = f"; held-out {last['eval'][1]:.3f} (step {last['eval'][0]})" if "eval" in last else ""
            log(f"step {step}/{cfg.steps}: train {row['bits_per_char']:.3f} bits/char{held}")

    t0 = time.perf_counter()
    if stop.signal is not None:
        raise Interrupted(stop.signal)
    try:
        result = training.fit(
            state,
            training.make_train_step(lm_loss),
            batches,
            num_steps=cfg.steps,
            rng=jax.random.key(cfg.seed + 2),
            carry=_initial_carry(cfg, model, state),
            eval_fn=evaluator,
            eval_every=cfg.eval_every,
            checkpoint_dir=out / "checkpoints",
            save_every=cfg.save_every,
            metrics_path=out / "metrics.jsonl",
            log_every=cfg.log_every,
            progress=progress,
            progress_metric="bits_per_char",
            on_eval=on_eval,
            on_record=on_record,
            log=log,
            best_metric="eval_bits_per_char",
            best_dir=out / "best",
            patience=cfg.patience or None,
            mesh=mesh,
        )
    except training.NonFiniteLossError as e:
        raise RunError(f"{e} The checkpoints hold only finite values.") from None
    except training.CheckpointError as e:
        raise RunError(f"{e} Start a new run with --overwrite or another --out.") from None
    except Exception as e:
        disk = _disk_problem(e)
        if disk is not None:
            raise RunError(
                f"cannot write the run in {out}: {disk}. The checkpoints saved before are kept; "
                "free space (or fix the permissions), then continue with --resume."
            ) from None
        if _out_of_memory(e):
            raise RunError(
                f"out of memory in a training step (--batch-size {cfg.batch_size}, --seq-len {cfg.seq_len}, "
                f"--hidden-size {cfg.hidden_size}); lower --batch-size or --seq-len. The last checkpoint is kept."
            ) from None
        raise
    wall = time.perf_counter() - t0
    interrupted = result.interrupted or stop.signal is not None
    if interrupted and not checkpoint_steps(out):
        raise Interrupted(stop.signal or signal.SIGINT)
    history = training.read_metrics(out / "metrics.jsonl")
    if interrupted:
        log(
            f"stopped at step {int(result.state.step)} of {cfg.steps} after {wall:.0f} s; saved. "
            f"Continue with: jaxlstm train --out {out} --resume"
        )
        return TrainResult(result.state, result.history, stop.signal or signal.SIGINT)
    cell = "output-map cell" if cfg.output_transform else "classic cell"
    text_sample = sample(model, result.state.params, cfg.vocab, "", 400, 0.8, cfg.seed)[0]  # every process
    if not writer:
        return TrainResult(result.state, result.history, None)
    plot_history(
        history,
        out / "loss.png",
        vocab_size=len(cfg.vocab),
        title=f"jaxlstm train: LSTM {cfg.hidden_size} x {cfg.num_layers} ({cell}), "
        f"batch {cfg.batch_size} x {cfg.seq_len}",
    )
    training.write_text_atomic(out / "sample.txt", text_sample)
    how = "stopped early" if result.early_stopped else "finished"
    log(f"{how} at step {int(result.state.step)} in {wall:.0f} s; wrote {out}/checkpoints, metrics.jsonl, loss.png")
    if result.best is not None:
        log(f"best held-out: {result.best['value']:.3f} bits/char at step {result.best['step']} (kept in {out}/best)")
    log("sample:\n" + text_sample)
    return TrainResult(result.state, result.history, None)


_DISK_ERRORS = {
    errno.ENOSPC: "No space left on device",
    errno.EROFS: "Read-only file system",
    errno.EACCES: "Permission denied",
    errno.EDQUOT: "Disk quota exceeded",
}


def _disk_problem(e: BaseException) -> str | None:
    """The file-system reason of a failed write (raised directly, or wrapped by orbax/tensorstore), if any."""
    if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
        return _DISK_ERRORS[e.errno]
    text = str(e)
    return next((reason for reason in _DISK_ERRORS.values() if reason in text), None)


def _out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def _state(cfg: Config):
    model = build(cfg)
    params = model.init(jax.random.key(cfg.seed), jnp.zeros((1, cfg.seq_len), jnp.int32), deterministic=True)["params"]
    tx = training.default_optimizer(
        cfg.learning_rate,
        total_steps=cfg.schedule_steps or cfg.steps,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
    )
    return model, training.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def _initial_carry(cfg: Config, model: CharLM, state):
    return zero_carry(model, state.params, cfg.batch_size, cfg.seq_len) if cfg.streams else None


def load(run_dir, log: Callable[[str], None] = print, *, best: bool = False):
    """``(model, params, config)`` from the newest intact checkpoint of a run folder (``best``: from the
    best held-out evaluation's, in ``<run>/best``)."""
    run_dir = pathlib.Path(run_dir)
    cfg = read_config(run_dir)
    model, state = _state(cfg)
    folder = "best" if best else "checkpoints"
    ckpt_dir = run_dir / folder
    if not checkpoint_steps(run_dir, folder):
        if best:
            raise RunError(f"{run_dir} holds no best checkpoint yet: it is written at the run's first evaluation.")
        raise RunError(f"{run_dir} holds no checkpoint yet: was the run stopped before its first save?")
    ckpt = training.Checkpointer(ckpt_dir, read_only=True)
    try:
        template = training.snapshot(state, jax.random.key(0), _initial_carry(cfg, model, state))
        step, snap = ckpt.restore(None, template, on_fallback=log)
    except training.CheckpointError as e:
        raise RunError(str(e)) from None
    finally:
        ckpt.close()
    if step != checkpoint_steps(run_dir, folder)[-1]:
        log(f"using checkpoint {step}, the newest intact one")
    elif best:
        log(f"using the best checkpoint, from step {step}")
    state, _, _ = training.from_snapshot(state, snap, None)
    return model, state.params, cfg


def generate(
    run_dir,
    prompt: str = "",
    length: int = 500,
    temperature: float = 0.8,
    seed: int = 0,
    log=print,
    *,
    top_k: int | None = None,
    top_p: float = 1.0,
    num_samples: int = 1,
    best: bool = False,
) -> list[str]:
    """Samples from the newest intact checkpoint of a run, or its best (see :func:`sample`); one string per sample."""
    check_sampling(temperature, top_k, top_p, num_samples)
    model, params, cfg = load(pathlib.Path(run_dir), log, best=best)
    return sample(
        model, params, cfg.vocab, prompt, length, temperature, seed, top_k=top_k, top_p=top_p, num_samples=num_samples
    )


__all__ = [
    "Config",
    "TrainResult",
    "RunError",
    "Interrupted",
    "train",
    "generate",
    "load",
    "read_config",
    "check_config",
    # the job's parts, re-exported (see the modules beside this one)
    "load_text",
    "split_text",
    "encode",
    "window_batches",
    "stream_batches",
    "training_batches",
    "held_out_streams",
    "build",
    "lm_loss",
    "make_evaluator",
    "zero_carry",
    "sample",
    "filter_logits",
    "check_sampling",
    "plot_history",
]
