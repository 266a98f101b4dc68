"""The main job's character language model in PyTorch, for a side-by-side at equal wall-clock time.

    python benchmarks/charlm_torch.py                 # the defaults of `jaxlstm train`, 600 s at most
    python benchmarks/charlm_torch.py --budget 300    # stop at 300 s
    python benchmarks/charlm_torch.py --quick         # a smoke run (tiny model, a few steps)
    python benchmarks/charlm_torch.py --streams       # against `jaxlstm train --streams`

Everything but the framework is the main job's (``jaxlstm train`` with no
arguments, read from :class:`jaxlstm.app.charlm.Config`): the embedded
Shakespeare text and its split (the last 5% held out), the very same batches
(``charlm.training_batches``: random windows, or with ``--streams`` contiguous
streams whose state carries from one step to the next, gradients cut between steps),
``Embed -> dropout -> LSTM -> dropout -> Dense``, the forget-gate bias at 1, AdamW with global-norm clipping at 1.0,
linear warm-up over 5% of the steps and cosine decay to 10%, and the held-out
text read as 16 contiguous streams with the state carried. The LSTM is
``torch.nn.LSTM``, which has only the classic cell (``tanh(c)``): compare it
with ``jaxlstm train --classic`` for the framework alone, and with
``jaxlstm train`` for what a user gets by default.

The clock runs from the first training step to the last evaluation,
evaluations included (PyTorch writes no checkpoints; ``jaxlstm train`` does).
Training stops at the schedule's last step or when ``--budget`` seconds have
passed, then the held-out text is evaluated. Writes ``charlm_torch.json`` to
``--out`` and prints one line per evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time

import numpy as np

from jaxlstm.app import charlm

RESULTS = pathlib.Path(__file__).parent / "results"


def build(vocab_size: int, cfg: charlm.Config):
    import torch
    from torch import nn

    class CharLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab_size, cfg.embed_dim)
            self.lstm = nn.LSTM(
                cfg.embed_dim,
                cfg.hidden_size,
                cfg.num_layers,
                batch_first=True,
                dropout=cfg.dropout_rate if cfg.num_layers > 1 else 0.0,
            )
            self.drop = nn.Dropout(cfg.dropout_rate)
            self.input_drop = nn.Dropout(cfg.input_dropout_rate)
            self.head = nn.Linear(cfg.hidden_size, vocab_size)
            H = cfg.hidden_size
            with torch.no_grad():  # PyTorch's gate order is i, f, g, o: the forget bias at 1, as jaxlstm's
                for layer in range(cfg.num_layers):
                    getattr(self.lstm, f"bias_ih_l{layer}")[H : 2 * H] = 1.0
                    getattr(self.lstm, f"bias_hh_l{layer}")[H : 2 * H] = 0.0

        def forward(self, tokens, state=None):
            ys, state = self.lstm(self.input_drop(self.embed(tokens)), state)
            return self.head(self.drop(ys)), state

    return CharLM()


def schedule(peak: float, total: int, warmup: int):
    """optax's ``warmup_cosine_decay_schedule(0, peak, warmup, total, 0.1 * peak)`` as a function of the step."""

    def lr(step: int) -> float:
        if step < warmup:
            return peak * step / warmup
        t = min(step - warmup, total - warmup) / max(total - warmup, 1)
        return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))

    return lr


def evaluator(model, tokens: np.ndarray, seq_len: int, streams: int = 16):
    """Held-out bits per character: ``streams`` contiguous streams read ``seq_len`` at a time, state carried."""
    import torch

    rows, chunks = charlm.held_out_streams(tokens, seq_len, streams)
    rows = torch.as_tensor(rows, dtype=torch.long)

    def evaluate() -> float:
        model.eval()
        total, state = 0.0, None
        with torch.no_grad():
            for c in range(chunks):
                x = rows[:, c * seq_len : (c + 1) * seq_len]
                y = rows[:, c * seq_len + 1 : (c + 1) * seq_len + 1]
                logits, state = model(x, state)
                total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
        model.train()
        return total / chunks / math.log(2)

    return evaluate


def setup(cfg: charlm.Config, text: str):
    """``(model, optimizer, batches, lr, evaluate)`` of the main job, in PyTorch."""
    import torch

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    vocab = "".join(sorted(set(text)))
    train_text, valid_text = charlm.split_text(text, cfg.seq_len)
    batches = charlm.training_batches(cfg, charlm.encode(train_text, vocab))
    model = build(len(vocab), cfg)
    evaluate = evaluator(model, charlm.encode(valid_text, vocab), cfg.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.steps // 20) if cfg.warmup_steps is None else cfg.warmup_steps
    return model, opt, batches, schedule(cfg.learning_rate, cfg.steps, warmup), evaluate


def train_step(model, opt, batches, lr, step: int, state, cfg: charlm.Config):
    """One training step on the main job's batch ``step``; returns the state to carry (``--streams``)."""
    import torch

    for group in opt.param_groups:
        group["lr"] = lr(step)
    batch = torch.as_tensor(np.array(batches(step)), dtype=torch.long)  # a writable copy
    logits, state = model(batch[:, :-1], state if cfg.streams else None)
    state = tuple(s.detach() for s in state)  # truncated BPTT: the state carries, its gradient does not
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return state


def run(cfg: charlm.Config, budget: float, text: str, log=print) -> dict:
    import torch

    model, opt, batches, lr, evaluate = setup(cfg, text)
    batches(0)  # compiled before the clock starts
    curve = []
    state = None
    t0 = time.perf_counter()
    step = 0
    while step < cfg.steps and time.perf_counter() - t0 < budget:
        state = train_step(model, opt, batches, lr, step, state, cfg)
        step += 1
        if step % cfg.eval_every == 0:
            curve.append((step, time.perf_counter() - t0, evaluate()))
            log(f"step {step}: held-out {curve[-1][2]:.3f} bits/char at {curve[-1][1]:.0f} s")
    if not curve or curve[-1][0] != step:
        curve.append((step, time.perf_counter() - t0, evaluate()))
        log(f"step {step}: held-out {curve[-1][2]:.3f} bits/char at {curve[-1][1]:.0f} s")
    return {
        "framework": f"torch {torch.__version__} (nn.LSTM, classic cell), {torch.get_num_threads()} threads",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "config": {k: v for k, v in vars(cfg).items() if k not in ("vocab", "text", "text_sha256")},
        "budget_s": budget,
        "steps_done": step,
        "curve": curve,
        "held_out_bits_per_char": curve[-1][2],
        "wall_s": curve[-1][1],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=600.0, help="seconds of training at most (default: 600)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny model, 6 steps (default: off)")
    p.add_argument("--streams", action="store_true", help="as `jaxlstm train --streams`: carried-state streams")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS, help="where to write charlm_torch.json")
    a = p.parse_args(argv)
    if not a.budget > 0:
        p.error(f"--budget must be a positive number of seconds, not {a.budget}")
    try:
        import torch  # noqa: F401
    except ImportError:
        print("charlm_torch.py: PyTorch is not installed (a CPU build: pip install 'torch==2.13.0')", file=sys.stderr)
        return 1
    cfg = charlm.Config()
    text = charlm.load_text(None)
    if a.quick:
        cfg = charlm.Config(embed_dim=8, hidden_size=16, seq_len=16, batch_size=4, steps=6, eval_every=3)
        text = text[:20_000]
    cfg.streams = a.streams
    try:
        result = run(cfg, a.budget, text, log=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        print("charlm_torch.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "charlm_torch.json").write_text(json.dumps(result, indent=1))
    print(
        f"PyTorch: held-out {result['held_out_bits_per_char']:.3f} bits/char after {result['steps_done']} steps "
        f"in {result['wall_s']:.0f} s; wrote {a.out / 'charlm_torch.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
