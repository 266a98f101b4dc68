"""The main job: a character-level language model trained with :mod:`jaxlstm.training`.

``jaxlstm train`` and ``jaxlstm generate`` are thin command-line wrappers of
:func:`train` and :func:`generate` here.

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
import functools
import gzip
import hashlib
import importlib.resources
import json
import math
import os
import pathlib
import shutil
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

DEFAULT_CORPUS = "shakespeare.txt.gz"
VALID_FRACTION = 0.05
FORMAT = "jaxlstm-charlm"
FORMAT_VERSION = 3
#: Fields added in format version 2, with the values that reproduce a version-1 run.
_ADDED_IN_2 = {
    "dropout_rate": 0.0,
    "recurrent_dropout_rate": 0.0,
    "weight_decay": 0.0,
    "warmup_steps": None,
    "log_every": 10,
    "patience": 0,
}
#: Fields added in format version 3, with the values that reproduce a version-1 or -2 run.
_ADDED_IN_3 = {"streams": False, "input_dropout_rate": 0.0}
LOCK_NAME = ".jaxlstm.lock"
#: Everything a run writes in its folder; ``--overwrite`` removes these and nothing else.
RUN_FILES = (
    "config.json",
    "checkpoints",
    "checkpoints.damaged",
    "best",
    "metrics.jsonl",
    "loss.png",
    "sample.txt",
)


class RunError(Exception):
    """A problem with the user's input (file, folder, options, run), reported as one line without a traceback."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the command before training started (nothing was written)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} before training started; nothing was written")
        self.signum = signum


@dataclasses.dataclass
class Config:
    """Everything that defines a run. The fields in :data:`IDENTITY` may not change on ``--resume``."""

    embed_dim: int = 64
    hidden_size: int = 384
    num_layers: int = 1
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 3000
    learning_rate: float = 4e-3
    seed: int = 0
    eval_every: int = 400
    save_every: int = 400
    output_transform: bool = True
    text: str | None = None  # absolute path of the text, None: the embedded corpus
    text_sha256: str = ""
    vocab: str = ""
    schedule_steps: int = 0  # the steps the learning-rate schedule was built for (0: ``steps``)
    dropout_rate: float = 0.3
    recurrent_dropout_rate: float = 0.0
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # None: 5% of the schedule
    log_every: int = 100
    patience: int = 0  # evaluations without a better held-out figure before stopping (0: never)
    streams: bool = False  # contiguous streams with the state carried between batches (False: random windows)
    input_dropout_rate: float = 0.1


#: Fields that define the trained function and its data; ``--resume`` refuses to change them.
IDENTITY = (
    "embed_dim",
    "hidden_size",
    "num_layers",
    "seq_len",
    "batch_size",
    "learning_rate",
    "seed",
    "output_transform",
    "dropout_rate",
    "recurrent_dropout_rate",
    "weight_decay",
    "warmup_steps",
    "streams",
    "input_dropout_rate",
)
#: Command-line names of the fields, for messages.
FLAGS = {
    "embed_dim": "--embed-dim",
    "hidden_size": "--hidden-size",
    "num_layers": "--layers",
    "seq_len": "--seq-len",
    "batch_size": "--batch-size",
    "steps": "--steps",
    "learning_rate": "--lr",
    "seed": "--seed",
    "eval_every": "--eval-every",
    "save_every": "--save-every",
    "output_transform": "--classic",
    "text": "--text",
    "dropout_rate": "--dropout",
    "recurrent_dropout_rate": "--recurrent-dropout",
    "weight_decay": "--weight-decay",
    "warmup_steps": "--warmup",
    "log_every": "--log-every",
    "patience": "--patience",
    "streams": "--streams",
    "input_dropout_rate": "--input-dropout",
}
_POSITIVE_INTS = (
    "embed_dim",
    "hidden_size",
    "num_layers",
    "seq_len",
    "batch_size",
    "steps",
    "eval_every",
    "save_every",
    "log_every",
)


def check_config(cfg: Config, source: str) -> Config:
    """Types and ranges of every field; ``source`` names where the values came from (for the message)."""
    problems = []
    for name in _POSITIVE_INTS:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            problems.append(f"{name} must be a positive integer, not {v!r}")
    lr = cfg.learning_rate
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        problems.append(f"learning_rate must be a finite positive number, not {lr!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        problems.append(f"seed must be an integer, not {cfg.seed!r}")
    for name in ("output_transform", "streams"):
        if not isinstance(getattr(cfg, name), bool):
            problems.append(f"{name} must be true or false, not {getattr(cfg, name)!r}")
    if cfg.text is not None and not isinstance(cfg.text, str):
        problems.append(f"text must be a path or null, not {cfg.text!r}")
    for name in ("text_sha256", "vocab"):
        if not isinstance(getattr(cfg, name), str):
            problems.append(f"{name} must be a string")
    for name in ("schedule_steps", "patience"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            problems.append(f"{name} must be a non-negative integer, not {v!r}")
    w = cfg.warmup_steps
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
        problems.append(f"warmup_steps must be a non-negative integer or null, not {w!r}")
    for name in ("dropout_rate", "recurrent_dropout_rate", "input_dropout_rate"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            problems.append(f"{name} must lie in [0, 1), not {v!r}")
    wd = cfg.weight_decay
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
        problems.append(f"weight_decay must be a finite number >= 0, not {wd!r}")
    if problems:
        raise RunError(f"{source}: " + "; ".join(problems) + ".")
    return cfg


# ------------------------------------------------------------------ data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _embedded_bytes() -> bytes:
    return gzip.decompress(importlib.resources.files("jaxlstm.app.data").joinpath(DEFAULT_CORPUS).read_bytes())


def _read_text_file(p: pathlib.Path) -> bytes:
    if not p.exists():
        raise RunError(f"text file not found: {p}. Give an existing UTF-8 text file with --text, or omit --text.")
    if not p.is_file():
        raise RunError(f"--text must be a file; {p} is a directory.")
    try:
        return p.read_bytes()
    except OSError as e:
        raise RunError(f"cannot read {p}: {e.strerror}.") from None


def _decode(raw: bytes, p: pathlib.Path) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RunError(
            f"{p} is not UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r}). Convert it first, e.g. "
            f"iconv -f latin1 -t utf-8 {p.name} > {p.stem}.utf8.txt"
        ) from None
    if not text.strip():
        raise RunError(f"{p} is empty: there is nothing to train on.")
    return text


def load_text(path: str | None) -> str:
    """The training text: a UTF-8 file, or the embedded corpus when ``path`` is None."""
    return _load(path)[0]


def _load(path: str | None) -> tuple[str, str]:
    """``(text, sha256 of its bytes)``."""
    if path is None:
        raw = _embedded_bytes()
        return raw.decode("utf-8"), _sha256(raw)
    p = pathlib.Path(path)
    raw = _read_text_file(p)
    return _decode(raw, p), _sha256(raw)


def split_text(text: str, seq_len: int) -> tuple[str, str]:
    """Train on the first 95%, hold out the last 5% (contiguous, never trained on)."""
    n_valid = max(int(len(text) * VALID_FRACTION), seq_len + 1)
    train, valid = text[:-n_valid], text[-n_valid:]
    if len(train) < seq_len + 1:
        raise RunError(
            f"--seq-len {seq_len} is longer than the training text ({len(train)} characters after holding out "
            f"{n_valid} for validation). Use a shorter --seq-len or a longer text."
        )
    return train, valid


def encode(text: str, vocab: str) -> np.ndarray:
    index = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted(set(text) - set(index))
    if unknown:
        raise RunError(f"characters outside the model's vocabulary: {''.join(unknown[:20])!r}.")
    return np.fromiter((index[ch] for ch in text), dtype=np.int32, count=len(text))


def window_batches(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
    """``batch_fn(step)``: random windows of ``seq_len + 1`` tokens, a pure function of the step."""
    data = jnp.asarray(tokens)
    key = jax.random.key(seed + 1)
    offsets_in = jnp.arange(seq_len + 1)

    @jax.jit
    def batch_at(step):
        starts = jax.random.randint(jax.random.fold_in(key, step), (batch_size,), 0, data.shape[0] - seq_len - 1)
        return data[starts[:, None] + offsets_in[None, :]]

    return lambda step: batch_at(jnp.asarray(step, jnp.int32))


def stream_batches(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
    """``batch_fn(step)``: ``batch_size`` contiguous streams of text, ``seq_len + 1`` tokens per row and step.

    The text is read as a ring cut into ``batch_size`` equal arcs, one per row. Row ``b`` of step
    ``s + 1`` continues row ``b`` of step ``s``: its first token is the last one of step ``s``'s row
    (the last target there, the first input here), so a state carried from one step to the next has
    read exactly the text before the row. An epoch is the ``arc // seq_len`` steps that read each arc
    once; every epoch starts the arcs at a new random offset (the carried state then meets unrelated
    text, as at a document boundary). A pure function of the step.
    """
    data = jnp.asarray(tokens)
    n = data.shape[0]
    arc = n // batch_size
    per_epoch = max(1, arc // seq_len)
    key = jax.random.key(seed + 1)
    offsets_in = jnp.arange(seq_len + 1, dtype=jnp.int32)
    rows = jnp.arange(batch_size, dtype=jnp.int32)

    @jax.jit
    def batch_at(step):
        epoch, k = step // per_epoch, step % per_epoch
        shift = jax.random.randint(jax.random.fold_in(key, epoch), (), 0, n, dtype=jnp.int32)
        starts = shift + rows * arc + k * seq_len
        return data[(starts[:, None] + offsets_in[None, :]) % n]

    return lambda step: batch_at(jnp.asarray(step, jnp.int32))


def training_batches(cfg: Config, tokens: np.ndarray):
    """The run's ``batch_fn``: :func:`stream_batches` when ``cfg.streams``, else :func:`window_batches`."""
    make = stream_batches if cfg.streams else window_batches
    return make(tokens, cfg.batch_size, cfg.seq_len, cfg.seed)


def zero_carry(model: CharLM, params, batch_size: int, seq_len: int):
    """The recurrent state that :func:`stream_batches` training starts from: zeros, one batch row per stream."""
    shapes = jax.eval_shape(
        lambda p: model.apply(
            {"params": p}, jnp.zeros((batch_size, seq_len), jnp.int32), deterministic=True, return_state=True
        )[1],
        params,
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


# ------------------------------------------------------------------ model and loss


def build(cfg: Config) -> CharLM:
    return CharLM(
        vocab_size=len(cfg.vocab),
        embed_dim=cfg.embed_dim,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        output_transform=cfg.output_transform,
        dropout_rate=cfg.dropout_rate,
        recurrent_dropout_rate=cfg.recurrent_dropout_rate,
        input_dropout_rate=cfg.input_dropout_rate,
    )


def lm_loss(params, state, batch, rng, carry):
    """Next-character cross-entropy (nats) of a ``(B, T + 1)`` token batch (dropout on, drawn from ``rng``)."""
    logits, new_carry = state.apply_fn(
        {"params": params}, batch[:, :-1], carry, deterministic=False, return_state=True, rngs={"dropout": rng}
    )
    loss = training.sequence_cross_entropy(logits, batch[:, 1:])
    return loss, ({"bits_per_char": training.to_bits(loss)}, new_carry if carry is not None else None)


def held_out_streams(tokens: np.ndarray, seq_len: int, streams: int = 16) -> tuple[np.ndarray, int]:
    """``(rows, chunks)``: held-out tokens cut into ``streams`` contiguous rows of ``chunks * seq_len + 1``
    tokens, read ``seq_len`` at a time with the state carried (the main job's evaluation, and the
    benchmarks' that compare with it)."""
    streams = max(1, min(streams, (len(tokens) - 1) // seq_len))
    chunks = (len(tokens) - 1) // streams // seq_len  # >= 1: split_text holds out at least seq_len + 1
    n = chunks * seq_len
    return np.stack([tokens[i * n : i * n + n + 1] for i in range(streams)]), chunks


def make_evaluator(model: CharLM, tokens: np.ndarray, seq_len: int, streams: int = 16):
    """Bits per character on held-out text, read as ``streams`` contiguous streams with the state carried."""
    rows, chunks = held_out_streams(tokens, seq_len, streams)
    streams, n = rows.shape[0], chunks * seq_len

    @jax.jit
    def chunk_nats(params, x, y, carry):
        logits, carry = model.apply({"params": params}, x, carry, deterministic=True, return_state=True)
        return training.sequence_cross_entropy(logits, y) * y.size, carry

    def evaluate(state) -> dict:
        carry, total = None, 0.0
        for c in range(chunks):
            x = jnp.asarray(rows[:, c * seq_len : (c + 1) * seq_len])
            y = jnp.asarray(rows[:, c * seq_len + 1 : (c + 1) * seq_len + 1])
            nats, carry = chunk_nats(state.params, x, y, carry)
            total += float(nats)
        nats = total / (streams * n)
        return {"loss": nats, "bits_per_char": nats / math.log(2)}

    return evaluate


def filter_logits(logits: jax.Array, temperature: float, top_k: int | None = None, top_p: float = 1.0) -> jax.Array:
    """Next-token logits ``(..., V)`` scaled by ``1 / temperature``, with all but the ``top_k`` most likely
    tokens and all outside the smallest set holding probability ``top_p`` (nucleus) set to ``-inf``."""
    logits = logits / temperature
    neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
        kept = jnp.where(before < top_p, ordered, jnp.asarray(jnp.inf, logits.dtype))
        threshold = jnp.min(kept, axis=-1, keepdims=True)  # the least likely token still kept
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits


def check_sampling(temperature: float, top_k: int | None, top_p: float, num_samples: int) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise RunError(f"--temperature must be a finite number >= 0 (0: greedy); received {temperature}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise RunError(f"--top-k must be a positive integer; received {top_k!r}.")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise RunError(f"--top-p must lie in (0, 1]; received {top_p!r}.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise RunError(f"--num-samples must be a positive integer; received {num_samples!r}.")


@functools.partial(jax.jit, static_argnums=0)
def _advance(model: CharLM, params, tokens, carry):
    """The logits after ``tokens`` and the new state (compiled once per model and token shape)."""
    logits, carry = model.apply({"params": params}, tokens, carry, deterministic=True, return_state=True)
    return logits[:, -1], carry


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def _choose(key, logits, *, temperature: float, top_k: int | None, top_p: float):
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p))


def sample(
    model: CharLM,
    params,
    vocab: str,
    prompt: str,
    length: int,
    temperature: float,
    seed: int,
    *,
    top_k: int | None = None,
    top_p: float = 1.0,
    num_samples: int = 1,
) -> list[str]:
    """``num_samples`` continuations of ``prompt`` by ``length`` characters each, drawn in one batch.

    ``temperature=0`` is greedy decoding (every sample the same); otherwise
    each character is drawn from the softmax of ``logits / temperature``,
    restricted by ``top_k`` and ``top_p`` (see :func:`filter_logits`).
    """
    check_sampling(temperature, top_k, top_p, num_samples)
    prompt = prompt or ("\n" if "\n" in vocab else vocab[0])
    ids = jnp.tile(jnp.asarray(encode(prompt, vocab))[None, :], (num_samples, 1))
    run = functools.partial(_advance, model)
    choose = functools.partial(_choose, temperature=temperature, top_k=top_k, top_p=top_p)
    logits, carry = run(params, ids, None)
    key = jax.random.key(seed)
    out = []
    for i in range(length):
        nxt = choose(jax.random.fold_in(key, i), logits)
        out.append(nxt)
        logits, carry = run(params, nxt[:, None].astype(jnp.int32), carry)
    if not out:
        return [prompt] * num_samples
    chosen = np.asarray(jnp.stack(out, axis=1))
    return [prompt + "".join(vocab[i] for i in row) for row in chosen]


def estimate_step_bytes(cfg: Config, vocab_size: int) -> int:
    """A lower bound on the memory one training step needs (activations kept for the backward pass)."""
    rows = cfg.batch_size * cfg.seq_len
    per_row = cfg.embed_dim + cfg.num_layers * 8 * cfg.hidden_size + 3 * vocab_size
    params = 4 * cfg.hidden_size * (cfg.hidden_size + cfg.embed_dim) * cfg.num_layers + cfg.hidden_size * vocab_size
    return 4 * (rows * per_row + 3 * params)


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def _check_memory(cfg: Config) -> None:
    need, have = estimate_step_bytes(cfg, len(cfg.vocab)), _memory_bytes()
    if have is not None and need > 0.8 * have:
        raise RunError(
            f"one training step needs at least {need / 2**30:.1f} GiB (--batch-size {cfg.batch_size} x --seq-len "
            f"{cfg.seq_len}, --hidden-size {cfg.hidden_size}, --layers {cfg.num_layers}), more than this machine's "
            f"{have / 2**30:.1f} GiB; lower --batch-size or --seq-len (or the model size)."
        )


# ------------------------------------------------------------------ run folders


def _config_text(cfg: Config) -> str:
    return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **dataclasses.asdict(cfg)}, indent=1)


def _read_json_config(path: pathlib.Path) -> dict | None:
    """The parsed ``config.json`` of a jaxlstm run, ``None`` if absent; RunError if it is not one of ours."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(
            f"{path} cannot be read as JSON ({e}); restore it, or start a new run in another --out."
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RunError(
            f"{path.parent} holds a config.json that jaxlstm did not write; choose another --out "
            "(jaxlstm never deletes files it did not write)."
        )
    return data


def read_config(run_dir: pathlib.Path) -> Config:
    run_dir = pathlib.Path(run_dir)
    path = run_dir / "config.json"
    if not run_dir.exists():
        raise RunError(f"run folder not found: {run_dir}.")
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is a file, not a run folder. Point at the --out of a training run.")
    data = _read_json_config(path)
    if data is None:
        raise RunError(f"{run_dir} is not a jaxlstm run folder (no config.json). Point at the --out of a training run.")
    version = data.get("format_version")
    if version not in (1, 2, FORMAT_VERSION):
        raise RunError(f"{path} has format version {version!r}; this jaxlstm reads 1 to {FORMAT_VERSION}.")
    fields = {k: v for k, v in data.items() if k not in ("format", "format_version")}
    # a run from before these options: they keep the values it was trained with
    if version == 1:
        fields = {**_ADDED_IN_2, **fields}
    if version in (1, 2):
        fields = {**_ADDED_IN_3, **fields}
    known = {f.name for f in dataclasses.fields(Config)}
    unknown, missing = sorted(set(fields) - known), sorted(known - set(fields))
    if unknown or missing:
        what = "; ".join(x for x in (unknown and f"unknown keys {unknown}", missing and f"missing keys {missing}") if x)
        raise RunError(f"{path} was edited and no longer describes a run ({what}).")
    return check_config(Config(**fields), f"{path} (edited?)")


def _has_run(out: pathlib.Path) -> bool:
    return _read_json_config(out / "config.json") is not None


def _checkpoint_steps(out: pathlib.Path) -> list[int]:
    d = out / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _remove_run_files(out: pathlib.Path) -> None:
    for name in RUN_FILES:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


class RunLock:
    """An exclusive lock on a run folder (``fcntl.flock``: released by the OS when the process dies)."""

    def __init__(self, out: pathlib.Path):
        self.path = out / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"cannot write in the run folder {self.path.parent}: {e.strerror}.") from None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock
            self._fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(
                f"another jaxlstm process (pid {other}) is training in {self.path.parent}; wait for it to finish "
                "or choose another --out."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None


def plot_history(history: list, path: pathlib.Path, *, vocab_size: int, title: str = "") -> None:
    """Training and held-out bits per character against the step, with the uniform-guess baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["bits_per_char"]) for h in history if "bits_per_char" in h]
    valid = [(h["step"], h["eval_bits_per_char"]) for h in history if "eval_bits_per_char" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="training (mean over each logging interval)", alpha=0.7)
    if valid:
        ax.plot(*zip(*valid), "o-", label="held-out (last 5% of the text)")
    uniform = math.log2(vocab_size)
    ax.axhline(uniform, color="grey", linestyle="--", linewidth=1, label=f"uniform guess, log2({vocab_size})")
    ax.set_xlabel("training step (one batch each)")
    ax.set_ylabel("cross-entropy (bits per character)")
    ax.set_title(title or "character language model")
    ax.set_ylim(bottom=0, top=uniform * 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _new_config(options: dict) -> Config:
    unknown = set(options) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise RunError(f"unknown options {sorted(unknown)}.")
    return check_config(Config(**options), "options")


def _resume_config(saved: Config, options: dict, completed: int, log) -> Config:
    """The saved config, with the options a resume may change; refuses changes to what defines the run."""
    diffs = []
    for name in IDENTITY:
        if name in options and options[name] != getattr(saved, name):
            flag = FLAGS[name]
            if name == "output_transform":
                diffs.append(f"{flag}: the run uses the {'output-map' if saved.output_transform else 'classic'} cell")
            elif name == "streams":
                diffs.append(f"{flag}: the run reads {'streams' if saved.streams else 'random windows'}")
            else:
                diffs.append(f"{flag}: the run has {getattr(saved, name)!r}, the command line {options[name]!r}")
    if diffs:
        raise RunError(
            "--resume continues a run exactly, and these options differ from it: "
            + "; ".join(diffs)
            + ". Drop them to continue, or start a new run with another --out."
        )
    changeable = ("eval_every", "save_every", "log_every", "patience")
    cfg = dataclasses.replace(saved, **{k: options[k] for k in changeable if k in options})
    schedule = saved.schedule_steps or saved.steps
    if "steps" in options and options["steps"] != saved.steps:
        steps = options["steps"]
        if steps < completed:
            raise RunError(f"--steps {steps}: the run has already completed {completed} steps.")
        if steps > schedule:
            log(
                f"lengthening the run from {saved.steps} to {steps} steps: the learning-rate schedule keeps its "
                f"{schedule}-step shape, so steps past {schedule} run at its final rate "
                f"({0.1 * saved.learning_rate:.3g})"
            )
        cfg = dataclasses.replace(cfg, steps=steps)
    return dataclasses.replace(cfg, schedule_steps=schedule)


def _resume_text(cfg: Config, text_option: str | None) -> str:
    """The run's text, checked against its stored hash (``--text`` may name a moved copy)."""
    path: str | None = cfg.text
    if text_option is not None:
        path = str(pathlib.Path(text_option).absolute())
    if path is None:
        raw = _embedded_bytes()
        where = "the embedded corpus"
    else:
        p = pathlib.Path(path)
        if not p.exists() and text_option is None:
            raise RunError(
                f"the run's text file {p} is gone; pass --text with a copy of it (it is checked against the "
                "hash stored in the run)."
            )
        raw = _read_text_file(p)
        where = str(p)
    if cfg.text_sha256 and _sha256(raw) != cfg.text_sha256:
        raise RunError(
            f"{where} is not the text this run was trained on (its SHA-256 differs from the one in config.json); "
            "give the original with --text, or start a new run with another --out."
        )
    return _decode(raw, pathlib.Path(path or DEFAULT_CORPUS))


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
        if writer and new_run and not _checkpoint_steps(out):
            _clean_failed_start(out, created, preexisting)
        raise


def _clean_failed_start(out: pathlib.Path, created: bool, preexisting: set) -> None:
    """A start that failed before its first checkpoint leaves behind nothing it wrote (nor a folder it made)."""
    try:
        for name in RUN_FILES + (LOCK_NAME,):
            p = out / name
            if name in preexisting or not (p.exists() or p.is_symlink()):
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if created and not any(out.iterdir()):
            out.rmdir()
    except OSError:
        pass


def _train_locked(options: dict, out: pathlib.Path, stop, *, resume: bool, overwrite: bool, progress: bool, log, mesh):
    writer = jax.process_index() == 0
    has_run = _has_run(out)
    if has_run and not (resume or overwrite):
        raise RunError(
            f"{out} already holds a run. Pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out."
        )
    if resume and not has_run:
        raise RunError(f"--resume: {out} holds no run to continue (no config.json).")
    # every option and file is checked before anything in the folder changes
    if resume:
        cfg = _resume_config(read_config(out), options, (_checkpoint_steps(out) or [0])[-1], log)
        text = _resume_text(cfg, options.get("text"))
    else:
        cfg = _new_config(options)
        text, digest = _load(cfg.text)
        cfg.text = None if cfg.text is None else str(pathlib.Path(cfg.text).absolute())
        cfg.text_sha256 = digest
        cfg.vocab = "".join(sorted(set(text)))
        cfg.schedule_steps = cfg.steps
    train_text, valid_text = split_text(text, cfg.seq_len)
    _check_memory(cfg)
    devices = 1 if mesh is None else mesh.shape["data"]
    if cfg.batch_size % devices:
        raise RunError(
            f"--batch-size {cfg.batch_size} cannot be split over {devices} devices; use a multiple of {devices} "
            "(or fewer devices: --cpu-devices)."
        )
    parallel.barrier("jaxlstm-run-checked")  # no process changes the folder before every one has read it
    if writer:
        if overwrite and has_run:
            _remove_run_files(out)
            log(f"--overwrite: removed the previous run's files from {out}")
        training.write_text_atomic(out / "config.json", _config_text(cfg))
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
    if interrupted and not _checkpoint_steps(out):
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


def load(run_dir, log: Callable[[str], None] = print):
    """``(model, params, config)`` from the newest intact checkpoint of a run folder."""
    run_dir = pathlib.Path(run_dir)
    cfg = read_config(run_dir)
    model, state = _state(cfg)
    ckpt_dir = run_dir / "checkpoints"
    if not _checkpoint_steps(run_dir):
        raise RunError(f"{run_dir} holds no checkpoint yet: was the run stopped before its first save?")
    ckpt = training.Checkpointer(ckpt_dir, read_only=True)
    try:
        template = training.snapshot(state, jax.random.key(0), _initial_carry(cfg, model, state))
        step, snap = ckpt.restore(None, template, on_fallback=log)
    except training.CheckpointError as e:
        raise RunError(str(e)) from None
    finally:
        ckpt.close()
    if step != _checkpoint_steps(run_dir)[-1]:
        log(f"using checkpoint {step}, the newest intact one")
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
) -> list[str]:
    """Samples from the newest intact checkpoint of a run (see :func:`sample`); one string per sample."""
    check_sampling(temperature, top_k, top_p, num_samples)
    model, params, cfg = load(pathlib.Path(run_dir), log)
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
]
