"""The text: the embedded corpus or a file, its split, its encoding, and the batches read from it."""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from .config import Config
from .errors import RunError

DEFAULT_CORPUS = "shakespeare.txt.gz"


VALID_FRACTION = 0.05


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def embedded_bytes() -> bytes:
    return gzip.decompress(importlib.resources.files("jaxlstm.app.data").joinpath(DEFAULT_CORPUS).read_bytes())


def read_text_file(p: pathlib.Path) -> bytes:
    if not p.exists():
        raise RunError(f"text file not found: {p}. Give an existing UTF-8 text file with --text, or omit --text.")
    if p.is_dir():
        raise RunError(f"--text must be a file; {p} is a directory.")
    if not p.is_file():
        raise RunError(f"--text must be a regular file; {p} is a device, a pipe or a socket, which cannot be split.")
    try:
        return p.read_bytes()
    except OSError as e:
        raise RunError(f"cannot read {p}: {e.strerror}.") from None


def decode(raw: bytes, p: pathlib.Path) -> str:
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
    return load_with_digest(path)[0]


def load_with_digest(path: str | None) -> tuple[str, str]:
    """``(text, sha256 of its bytes)``."""
    if path is None:
        raw = embedded_bytes()
        return raw.decode("utf-8"), sha256(raw)
    p = pathlib.Path(path)
    raw = read_text_file(p)
    return decode(raw, p), sha256(raw)


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


def held_out_streams(tokens: np.ndarray, seq_len: int, streams: int = 16) -> tuple[np.ndarray, int]:
    """``(rows, chunks)``: held-out tokens cut into ``streams`` contiguous rows of ``chunks * seq_len + 1``
    tokens, read ``seq_len`` at a time with the state carried (the main job's evaluation, and the
    benchmarks' that compare with it)."""
    streams = max(1, min(streams, (len(tokens) - 1) // seq_len))
    chunks = (len(tokens) - 1) // streams // seq_len  # >= 1: split_text holds out at least seq_len + 1
    n = chunks * seq_len
    return np.stack([tokens[i * n : i * n + n + 1] for i in range(streams)]), chunks


def resume_text(cfg: Config, text_option: str | None) -> str:
    """The run's text, checked against its stored hash (``--text`` may name a moved copy)."""
    path: str | None = cfg.text
    if text_option is not None:
        path = str(pathlib.Path(text_option).absolute())
    if path is None:
        raw = embedded_bytes()
        where = "the embedded corpus"
    else:
        p = pathlib.Path(path)
        if not p.exists() and text_option is None:
            raise RunError(
                f"the run's text file {p} is gone; pass --text with a copy of it (it is checked against the "
                "hash stored in the run)."
            )
        raw = read_text_file(p)
        where = str(p)
    if cfg.text_sha256 and sha256(raw) != cfg.text_sha256:
        raise RunError(
            f"{where} is not the text this run was trained on (its SHA-256 differs from the one in config.json); "
            "give the original with --text, or start a new run with another --out."
        )
    return decode(raw, pathlib.Path(path or DEFAULT_CORPUS))
