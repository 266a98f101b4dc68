"""The training curve of a run (``loss.png``)."""

from __future__ import annotations

import math
import os
import pathlib


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
