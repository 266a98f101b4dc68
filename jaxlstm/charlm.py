"""The main job: a character-level language model trained with :mod:`jaxlstm.training`.

``jaxlstm train`` and ``jaxlstm generate`` are thin command-line wrappers of
:func:`train` and :func:`generate` here.

A run folder holds ``config.json`` (model and data settings, the vocabulary),
``checkpoints/`` (orbax), ``metrics.jsonl``, ``loss.png`` and ``sample.txt``.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import json
import math
import pathlib
import shutil
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import training
from .linen import CharLM

DEFAULT_CORPUS = "shakespeare.txt.gz"
VALID_FRACTION = 0.05


class RunError(Exception):
    """A problem with the user's input (file, folder, options), reported without a traceback."""


@dataclasses.dataclass
class Config:
    embed_dim: int = 64
    hidden_size: int = 256
    num_layers: int = 1
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 3000
    learning_rate: float = 4e-3
    seed: int = 0
    eval_every: int = 500
    save_every: int = 500
    output_transform: bool = True
    text: Optional[str] = None  # None: the embedded corpus
    vocab: str = ""


# ------------------------------------------------------------------ data


def load_text(path: Optional[str]) -> str:
    """The training text: a UTF-8 file, or the embedded corpus when ``path`` is None."""
    if path is None:
        data = importlib.resources.files("jaxlstm.data").joinpath(DEFAULT_CORPUS).read_bytes()
        return gzip.decompress(data).decode("utf-8")
    p = pathlib.Path(path)
    if not p.exists():
        raise RunError(f"text file not found: {p}. Give an existing UTF-8 text file with --text, or omit --text.")
    if not p.is_file():
        raise RunError(f"--text must be a file; {p} is a directory.")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RunError(
            f"{p} is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}). Convert it first, e.g. "
            f"iconv -f latin1 -t utf-8 {p.name} > {p.stem}.utf8.txt"
        ) from None
    if not text.strip():
        raise RunError(f"{p} is empty: there is nothing to train on.")
    return text


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


# ------------------------------------------------------------------ model and loss


def build(cfg: Config) -> CharLM:
    return CharLM(
        vocab_size=len(cfg.vocab),
        embed_dim=cfg.embed_dim,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        output_transform=cfg.output_transform,
    )


def lm_loss(params, state, batch, rng, carry):
    """Next-character cross-entropy (nats) of a ``(B, T + 1)`` token batch."""
    del rng
    logits, new_carry = state.apply_fn({"params": params}, batch[:, :-1], carry, return_state=True)
    loss = training.sequence_cross_entropy(logits, batch[:, 1:])
    return loss, ({"bits_per_char": training.to_bits(loss)}, new_carry if carry is not None else None)


def make_evaluator(model: CharLM, tokens: np.ndarray, seq_len: int, streams: int = 16):
    """Bits per character on held-out text, read as ``streams`` contiguous streams with the state carried."""
    streams = max(1, min(streams, (len(tokens) - 1) // seq_len))
    chunks = (len(tokens) - 1) // streams // seq_len  # >= 1: split_text holds out at least seq_len + 1
    n = chunks * seq_len
    rows = np.stack([tokens[i * n : i * n + n + 1] for i in range(streams)])

    @jax.jit
    def chunk_nats(params, x, y, carry):
        logits, carry = model.apply({"params": params}, x, carry, return_state=True)
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


def sample(model: CharLM, params, vocab: str, prompt: str, length: int, temperature: float, seed: int) -> str:
    """Continue ``prompt`` by ``length`` characters sampled at ``temperature``."""
    if temperature <= 0:
        raise RunError(f"--temperature must be positive; received {temperature}.")
    prompt = prompt or ("\n" if "\n" in vocab else vocab[0])
    ids = jnp.asarray(encode(prompt, vocab))[None, :]

    @jax.jit
    def run(params, tokens, carry):
        logits, carry = model.apply({"params": params}, tokens, carry, return_state=True)
        return logits[:, -1], carry

    logits, carry = run(params, ids, None)
    key = jax.random.key(seed)
    out = []
    for i in range(length):
        nxt = jax.random.categorical(jax.random.fold_in(key, i), logits / temperature)
        out.append(int(nxt[0]))
        logits, carry = run(params, nxt[:, None].astype(jnp.int32), carry)
    return prompt + "".join(vocab[i] for i in out)


# ------------------------------------------------------------------ run folders


def _state(cfg: Config):
    model = build(cfg)
    params = model.init(jax.random.key(cfg.seed), jnp.zeros((1, cfg.seq_len), jnp.int32))["params"]
    tx = training.default_optimizer(cfg.learning_rate, total_steps=cfg.steps)
    return model, training.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def prepare_output(out: pathlib.Path, resume: bool, overwrite: bool) -> None:
    has_run = (out / "config.json").exists() or (out / "checkpoints").exists()
    if has_run and not (resume or overwrite):
        raise RunError(
            f"{out} already holds a run. Pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out."
        )
    if overwrite and out.exists():
        shutil.rmtree(out)
    if resume and not has_run:
        raise RunError(f"--resume: {out} holds no run to continue (no config.json).")
    out.mkdir(parents=True, exist_ok=True)


def read_config(run_dir: pathlib.Path) -> Config:
    path = run_dir / "config.json"
    if not run_dir.exists():
        raise RunError(f"checkpoint folder not found: {run_dir}.")
    if not path.exists():
        raise RunError(f"{run_dir} is not a jaxlstm run folder (no config.json). Point at the --out of a training run.")
    try:
        data = json.loads(path.read_text())
        return Config(**data)
    except (json.JSONDecodeError, TypeError) as e:
        raise RunError(f"{path} does not describe a jaxlstm char model ({e}).") from None


def plot_history(history: list, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["bits_per_char"]) for h in history if "bits_per_char" in h]
    valid = [(h["step"], h["eval_bits_per_char"]) for h in history if "eval_bits_per_char" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train (batch)", alpha=0.7)
    if valid:
        ax.plot(*zip(*valid), "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(cfg: Config, out: pathlib.Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True, log=print):
    """Train (or resume) a character model in ``out``; returns ``(state, history)``."""
    out = pathlib.Path(out)
    prepare_output(out, resume, overwrite)
    if resume:
        saved = read_config(out)
        saved.steps = cfg.steps  # allow extending a run
        cfg = saved
    text = load_text(cfg.text)
    train_text, valid_text = split_text(text, cfg.seq_len)
    if not cfg.vocab:
        cfg.vocab = "".join(sorted(set(text)))
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    log(
        f"corpus: {len(text):,} characters ({'embedded Shakespeare' if cfg.text is None else cfg.text}), "
        f"vocabulary {len(cfg.vocab)}; training on {len(train_text):,}, holding out the last {len(valid_text):,}"
    )
    model, state = _state(cfg)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params))
    log(f"model: Embed({cfg.embed_dim}) -> LSTM({cfg.hidden_size} x {cfg.num_layers}) -> Dense; {n_params:,} parameters")
    batches = window_batches(encode(train_text, cfg.vocab), cfg.batch_size, cfg.seq_len, cfg.seed)
    evaluator = make_evaluator(model, encode(valid_text, cfg.vocab), cfg.seq_len)

    def on_eval(step, ev):
        log(f"step {step}: held-out {ev['eval_bits_per_char']:.3f} bits/char")

    t0 = time.perf_counter()
    result = training.fit(
        state,
        training.make_train_step(lm_loss),
        batches,
        num_steps=cfg.steps,
        rng=jax.random.key(cfg.seed + 2),
        eval_fn=evaluator,
        eval_every=cfg.eval_every,
        checkpoint_dir=out / "checkpoints",
        save_every=cfg.save_every,
        metrics_path=out / "metrics.jsonl",
        progress=progress,
        on_eval=on_eval,
    )
    wall = time.perf_counter() - t0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    plot_history(history, out / "loss.png")
    text_sample = sample(model, result.state.params, cfg.vocab, "", 400, 0.8, cfg.seed)
    (out / "sample.txt").write_text(text_sample)
    status = "interrupted" if result.interrupted else "finished"
    log(f"{status} at step {int(result.state.step)} in {wall:.0f} s; wrote {out}/checkpoints, metrics.jsonl, loss.png")
    log("sample:\n" + text_sample)
    return result.state, result.history


def load(run_dir: pathlib.Path):
    """``(model, params, config)`` from the latest checkpoint of a run folder."""
    run_dir = pathlib.Path(run_dir)
    cfg = read_config(run_dir)
    model, state = _state(cfg)
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.exists():
        raise RunError(f"{run_dir} has no checkpoints/ folder: was the run stopped before its first save?")
    ckpt = training.Checkpointer(ckpt_dir)
    try:
        snap = ckpt.restore(None, training._snapshot(state, jax.random.key(0), None))
    except FileNotFoundError:
        raise RunError(f"{ckpt_dir} holds no checkpoint.") from None
    except Exception as e:  # orbax raises various errors on a mismatched tree
        raise RunError(f"the checkpoint in {ckpt_dir} does not fit the model described by config.json: {e}") from None
    finally:
        ckpt.close()
    state, _, _ = training._from_snapshot(state, snap, None)
    return model, state.params, cfg


def generate(run_dir, prompt: str = "", length: int = 500, temperature: float = 0.8, seed: int = 0) -> str:
    model, params, cfg = load(pathlib.Path(run_dir))
    return sample(model, params, cfg.vocab, prompt, length, temperature, seed)
