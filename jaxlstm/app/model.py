"""The character model: building it, its loss, its held-out evaluation, sampling, and its memory need."""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from .. import training
from ..linen import CharLM
from .config import Config
from .corpus import encode, held_out_streams
from .errors import RunError


def zero_carry(model: CharLM, params, batch_size: int, seq_len: int):
    """The recurrent state that :func:`stream_batches` training starts from: zeros, one batch row per stream."""
    shapes = jax.eval_shape(
        lambda p: model.apply(
            {"params": p}, jnp.zeros((batch_size, seq_len), jnp.int32), deterministic=True, return_state=True
        )[1],
        params,
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


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
    tokens and all outside the smallest set holding probability ``top_p`` (nucleus) set to ``-inf``.

    The logits are shifted by their maximum first (which changes no probability) and the temperature is
    held within [1e-30, 1e30], which changes none in float32 either: a tiny temperature then gives the
    most likely token (the limit), not an overflow to NaN, and a huge one the uniform choice.
    """
    temperature = min(max(float(temperature), 1e-30), 1e30)
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
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


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def check_memory(cfg: Config) -> None:
    need, have = estimate_step_bytes(cfg, len(cfg.vocab)), memory_bytes()
    if have is not None and need > 0.8 * have:
        raise RunError(
            f"one training step needs at least {need / 2**30:.1f} GiB (--batch-size {cfg.batch_size} x --seq-len "
            f"{cfg.seq_len}, --hidden-size {cfg.hidden_size}, --layers {cfg.num_layers}), more than this machine's "
            f"{have / 2**30:.1f} GiB; lower --batch-size or --seq-len (or the model size)."
        )
