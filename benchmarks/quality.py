"""Does the output-map cell earn its place? The two cells trained side by side on real tasks.

    python benchmarks/quality.py            # the full study (half an hour here as two processes)
    python benchmarks/quality.py --quick    # a smoke run: every task, a few steps
    python benchmarks/quality.py --only adding100 xor

jaxlstm's output-map cell computes its output gate as
``tanh(W_o c + b_o) * sigmoid(W_f3 [a, x] + b_f3)``, a learned linear map of
the new cell state inside the ``tanh``; the classic cell has ``tanh(c)``. This
script trains both with everything else equal (the same initial weights where
they share them, ``W_o`` starting at the identity so that the two start as the
same function, the same data, optimiser and steps), three seeds each, on:

* ``adding100``, ``adding500``: the adding problem (Hochreiter & Schmidhuber,
  1997) at T = 100 and T = 500: steps to reach test MSE 0.01 and the final MSE
  (predicting the mean scores 1/6 ~ 0.167);
* ``xor``: delayed XOR at T = 30: two marked bits among noise bits, the
  answer their XOR, read from the last state. The classic cell shows its
  memory through ``tanh(c)`` one coordinate at a time, so XOR of two remembered
  bits (not linearly separable) must be built by the gates as the second bit
  arrives; the learned map mixes the memory before the ``tanh`` and can
  represent it at read-out. If the output map ever matters, it should here;
* ``charlm``: a character language model on the embedded Shakespeare text,
  held-out bits per character at equal steps and at equal training time (the
  classic cell is cheaper per step, so it gets ``steps * cost(output map) /
  cost(classic)`` steps, costs measured in this run); plus two other
  initialisations of ``W_o`` (orthogonal, Glorot-uniform);
* ``vowels``: Japanese Vowels (Kudo, Toyama & Shimbo, 1999; shipped by the
  ``aeon`` package, so nothing is downloaded): nine speakers, 12 cepstrum
  coefficients per frame, sequences of 7 to 29 frames (``seq_lengths``), 270
  training and 370 test utterances; test accuracy (the data set's authors
  reported 94.1%).

Seeds train one after another, with one compiled step per cell. The cost per
step of each cell is timed separately: alternating cells, after warm-up,
``block_until_ready``, medians. ``--only`` reruns some tasks and keeps the
other tasks' results in ``quality.json``. Writes ``quality.md``, ``quality.json`` and ``quality.png`` to
``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlstm

RESULTS = pathlib.Path(__file__).parent / "results"
CELLS = {"output map": True, "classic": False}
#: Other initialisations of ``W_o`` tried on the language model (the default is the identity).
W_O_INITS: dict[str, Callable] = {
    "orthogonal": jax.nn.initializers.orthogonal(),
    "Glorot-uniform": jax.nn.initializers.glorot_uniform(),
}


# ------------------------------------------------------------------ models: LSTM -> Dense on pure pytrees


def init_model(key, input_size: int, hidden: int, outputs: int, output_transform: bool, output_init=None, vocab=None):
    k_lstm, k_head, k_embed = jax.random.split(key, 3)
    params: dict[str, Any] = {
        "lstm": jaxlstm.init_params(
            k_lstm, input_size, hidden, output_transform=output_transform, output_init=output_init
        ),
        "head": {
            "w": jax.nn.initializers.glorot_uniform()(k_head, (hidden, outputs)),
            "b": jnp.zeros((outputs,)),
        },
    }
    if vocab is not None:
        params["embed"] = jax.random.normal(k_embed, (vocab, input_size)) / math.sqrt(input_size)
    return params


def head(params, h):
    return h @ params["head"]["w"] + params["head"]["b"]


def last_hidden(params, xs, seq_lengths=None):
    _, state = jaxlstm.lstm(params["lstm"], xs, seq_lengths=seq_lengths)
    return state.hidden


# ------------------------------------------------------------------ tasks


@dataclass
class Task:
    """One experiment: how to make a model, a training batch, the loss, and the held-out metrics (pure, vmappable)."""

    name: str
    title: str
    init: Callable  # (key, output_transform, output_init) -> params
    batch: Callable  # (key, step) -> batch
    loss: Callable  # (params, batch) -> scalar
    evaluate: Callable  # (params) -> {metric: scalar}
    metric: str  # the headline held-out metric
    lower_is_better: bool
    target: float  # "steps to reach" threshold on ``metric``
    baseline: float  # what a model that ignores its input scores
    steps: int
    eval_every: int
    lr: float
    notes: str = ""


def adding_data(key, batch: int, T: int):
    kv, k1, k2 = jax.random.split(key, 3)
    values = jax.random.uniform(kv, (batch, T), jnp.float32)
    first = jax.random.randint(k1, (batch,), 0, T // 2)
    second = jax.random.randint(k2, (batch,), T // 2, T)
    t = jnp.arange(T)[None, :]
    marks = ((t == first[:, None]) | (t == second[:, None])).astype(jnp.float32)
    return jnp.stack([values, marks], -1), jnp.sum(values * marks, axis=1)


def xor_data(key, batch: int, T: int):
    kb, k1, k2 = jax.random.split(key, 3)
    bits = jax.random.bernoulli(kb, 0.5, (batch, T)).astype(jnp.float32)
    first = jax.random.randint(k1, (batch,), 0, T // 2)
    second = jax.random.randint(k2, (batch,), T // 2, T)
    t = jnp.arange(T)[None, :]
    marks = ((t == first[:, None]) | (t == second[:, None])).astype(jnp.float32)
    target = jnp.mod(jnp.sum(bits * marks, axis=1), 2.0)
    return jnp.stack([2.0 * bits - 1.0, marks], -1), target


def adding_task(T: int, steps: int, quick: bool) -> Task:
    hidden, batch = (16, 16) if quick else (64, 64)
    test_x, test_y = adding_data(jax.random.key(12345), 256 if quick else 2048, T)

    def predict(params, xs):
        return head(params, last_hidden(params, xs))[..., 0]

    return Task(
        name=f"adding{T}",
        title=f"adding problem, T = {T}",
        init=lambda key, ot, oi: init_model(key, 2, hidden, 1, ot, oi),
        batch=lambda key, step: adding_data(jax.random.fold_in(key, step), batch, T),
        loss=lambda p, b: jnp.mean((predict(p, b[0]) - b[1]) ** 2),
        evaluate=lambda p: {"test MSE": jnp.mean((predict(p, test_x) - test_y) ** 2)},
        metric="test MSE",
        lower_is_better=True,
        target=0.01,
        baseline=1.0 / 6.0,
        steps=steps,
        eval_every=max(1, steps // 40),
        lr=2e-3,
        notes=f"H = {hidden}, batch {batch}, Adam 2e-3, clipping 1.0",
    )


def xor_task(T: int, steps: int, quick: bool) -> Task:
    hidden, batch = (16, 16) if quick else (64, 64)
    test_x, test_y = xor_data(jax.random.key(54321), 256 if quick else 2048, T)

    def logit(params, xs):
        return head(params, last_hidden(params, xs))[..., 0]

    def accuracy(p):
        return jnp.mean((logit(p, test_x) > 0) == (test_y > 0.5))

    return Task(
        name="xor",
        title=f"delayed XOR, T = {T}",
        init=lambda key, ot, oi: init_model(key, 2, hidden, 1, ot, oi),
        batch=lambda key, step: xor_data(jax.random.fold_in(key, step), batch, T),
        loss=lambda p, b: jnp.mean(optax.sigmoid_binary_cross_entropy(logit(p, b[0]), b[1])),
        evaluate=lambda p: {"test accuracy": accuracy(p)},
        metric="test accuracy",
        lower_is_better=False,
        target=0.99,
        baseline=0.5,
        steps=steps,
        eval_every=max(1, steps // 40),
        lr=2e-3,
        notes=f"H = {hidden}, batch {batch}, Adam 2e-3, clipping 1.0",
    )


def charlm_task(steps: int, quick: bool) -> Task:
    from jaxlstm.app import charlm

    embed, hidden, batch, T = (8, 32, 8, 32) if quick else (32, 128, 32, 64)
    text = charlm.load_text(None)
    if quick:
        text = text[:40_000]
    vocab = "".join(sorted(set(text)))
    train_text, valid_text = charlm.split_text(text, T)
    train = jnp.asarray(charlm.encode(train_text, vocab))
    valid = charlm.encode(valid_text, vocab)
    # the held-out text as 16 contiguous streams read T characters at a time, the state carried
    rows, chunks = charlm.held_out_streams(valid, T)
    streams = rows.shape[0]
    xs_valid = jnp.asarray(rows[:, :-1].reshape(streams, chunks, T).transpose(1, 0, 2))
    ys_valid = jnp.asarray(rows[:, 1:].reshape(streams, chunks, T).transpose(1, 0, 2))

    def logits(params, tokens, state=None):
        ys, state = jaxlstm.lstm(params["lstm"], params["embed"][tokens], state)
        return head(params, ys), state

    def nats(params, tokens, targets, state=None):
        out, state = logits(params, tokens, state)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, targets)), state

    def held_out_bits(params):
        def chunk(state, xy):
            loss, state = nats(params, xy[0], xy[1], state)
            return state, loss

        _, losses = jax.lax.scan(chunk, jaxlstm.zero_state(params["lstm"], (streams,)), (xs_valid, ys_valid))
        return jnp.mean(losses) / math.log(2)

    def batch_at(key, step):
        starts = jax.random.randint(jax.random.fold_in(key, step), (batch,), 0, train.shape[0] - T - 1)
        return train[starts[:, None] + jnp.arange(T + 1)[None, :]]

    return Task(
        name="charlm",
        title="character LM, embedded Shakespeare",
        init=lambda key, ot, oi: init_model(key, embed, hidden, len(vocab), ot, oi, vocab=len(vocab)),
        batch=batch_at,
        loss=lambda p, b: nats(p, b[:, :-1], b[:, 1:])[0],
        evaluate=lambda p: {"held-out bits/char": held_out_bits(p)},
        metric="held-out bits/char",
        lower_is_better=True,
        target=2.5,
        baseline=math.log2(len(vocab)),
        steps=steps,
        eval_every=max(1, steps // 20),
        lr=3e-3,
        notes=f"Embed {embed} -> LSTM {hidden} -> Dense, random windows of {batch} x {T}, Adam 3e-3, clipping 1.0",
    )


def vowels_task(steps: int, quick: bool) -> Task:
    try:
        from aeon.datasets import load_japanese_vowels
    except ImportError:
        raise SystemExit(
            "quality.py: the vowels task needs aeon (pip install -e '.[bench]'), or leave it out with --only"
        ) from None

    def load(split):
        X, y = load_japanese_vowels(split=split)
        lengths = np.array([x.shape[1] for x in X], np.int32)
        xs = np.zeros((len(X), lengths.max(), X[0].shape[0]), np.float32)
        for i, x in enumerate(X):
            xs[i, : x.shape[1]] = x.T
        return xs, lengths, np.asarray(y).astype(int) - 1

    x_train, len_train, y_train = load("train")
    x_test, len_test, y_test = load("test")
    # standardise each coefficient with the training frames' statistics (padding excluded)
    frames = np.concatenate([x[:n] for x, n in zip(x_train, len_train)])
    mean, std = frames.mean(0), frames.std(0)
    valid_train = np.arange(x_train.shape[1])[None, :, None] < len_train[:, None, None]
    valid_test = np.arange(x_test.shape[1])[None, :, None] < len_test[:, None, None]
    x_train = jnp.asarray(np.where(valid_train, (x_train - mean) / std, 0.0))
    x_test = jnp.asarray(np.where(valid_test, (x_test - mean) / std, 0.0))
    len_train, y_train = jnp.asarray(len_train), jnp.asarray(y_train)
    len_test, y_test = jnp.asarray(len_test), jnp.asarray(y_test)
    classes = 9
    hidden, batch = (16, 32) if quick else (64, 32)

    def class_logits(params, xs, lengths):
        return head(params, last_hidden(params, xs, lengths))

    def batch_at(key, step):
        pick = jax.random.randint(jax.random.fold_in(key, step), (batch,), 0, x_train.shape[0])
        return x_train[pick], len_train[pick], y_train[pick]

    def loss(params, b):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(class_logits(params, b[0], b[1]), b[2]))

    def accuracy(params):
        return jnp.mean(jnp.argmax(class_logits(params, x_test, len_test), -1) == y_test)

    return Task(
        name="vowels",
        title="Japanese Vowels (9 speakers)",
        init=lambda key, ot, oi: init_model(key, 12, hidden, classes, ot, oi),
        batch=batch_at,
        loss=loss,
        evaluate=lambda p: {"test accuracy": accuracy(p)},
        metric="test accuracy",
        lower_is_better=False,
        target=0.941,
        baseline=float(np.max(np.bincount(np.asarray(y_test))) / len(y_test)),
        steps=steps,
        eval_every=max(1, steps // 40),
        lr=3e-3,
        notes=f"H = {hidden}, batch {batch}, Adam 3e-3, clip 1.0; target: 94.1%, as the data set's authors reported",
    )


# ------------------------------------------------------------------ training (all seeds at once) and timing


def _optimizer(task: Task):
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(task.lr))


def _one_step(task: Task, tx):
    def step(params, opt_state, data_key, i):
        loss, grads = jax.value_and_grad(task.loss)(params, task.batch(data_key, i))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


class Trainer:
    """One cell's compiled training step and evaluation, which serve every seed, every run of the cell
    (the ``W_o`` initialisations included) and the timing. Seeds run one after another: on a CPU,
    ``jax.vmap`` over seeds turns the small matmuls into batched ones and was twice as slow."""

    def __init__(self, task: Task, output_transform: bool, seeds: int):
        self.task, self.output_transform, self.seeds = task, output_transform, seeds
        self.tx = _optimizer(task)
        self.step = jax.jit(_one_step(task, self.tx), donate_argnums=(0, 1))
        self.evaluate = jax.jit(task.evaluate)

    def _keys(self, seed: int):
        key = jax.random.fold_in(jax.random.key(2026), seed)
        return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)  # initial weights, data

    def start(self, seed: int, output_init=None):
        params = self.task.init(self._keys(seed)[0], self.output_transform, output_init)
        return params, self.tx.init(params)

    def time_steps(self, state, n: int) -> tuple[float, Any]:
        """Seconds per step over ``n`` steps (the state is advanced and handed back)."""
        params, opt_state = state
        data_key = self._keys(0)[1]
        t = time.perf_counter()
        for i in range(n):
            params, opt_state, loss = self.step(params, opt_state, data_key, jnp.int32(i))
        jax.block_until_ready(loss)
        return (time.perf_counter() - t) / n, (params, opt_state)

    def run(self, steps: int, output_init=None, log=print, also_at: int | None = None) -> dict:
        """Train each seed from fresh parameters; the learning curve of the held-out metric, one column per seed
        (evaluated every ``task.eval_every`` steps, at the last step and at ``also_at``)."""
        task = self.task
        eval_at = sorted(set(range(task.eval_every, steps + 1, task.eval_every)) | {steps} | {also_at or steps})
        columns, losses = [], []
        t0 = time.perf_counter()
        for seed in range(self.seeds):
            params, opt_state = self.start(seed, output_init)
            data_key = self._keys(seed)[1]
            column, loss_column = [], []
            for i in range(1, steps + 1):
                params, opt_state, loss = self.step(params, opt_state, data_key, jnp.int32(i))
                if i in eval_at:
                    column.append(float(self.evaluate(params)[task.metric]))
                    loss_column.append(float(loss))
            log(f"  {task.name} seed {seed}: {task.metric} {column[-1]:.4f} after {steps} steps")
            columns.append(column)
            losses.append(loss_column)
        curve = [(s, [c[k] for c in columns]) for k, s in enumerate(eval_at)]
        train_loss = [(s, [c[k] for c in losses]) for k, s in enumerate(eval_at)]
        return {"curve": curve, "train_loss": train_loss, "wall_s": time.perf_counter() - t0}


def step_costs(trainers: dict[str, Trainer], rounds: int, inner: int) -> dict[str, float]:
    """Median seconds of one training step per cell: alternating rounds after warm-up."""
    states = {cell: tr.start(0) for cell, tr in trainers.items()}
    for cell, tr in trainers.items():  # compile and warm up
        _, states[cell] = tr.time_steps(states[cell], 2)
    times: dict[str, list[float]] = {cell: [] for cell in trainers}
    for _ in range(rounds):
        for cell, tr in trainers.items():
            t, states[cell] = tr.time_steps(states[cell], inner)
            times[cell].append(t)
    return {cell: statistics.median(ts) for cell, ts in times.items()}


# ------------------------------------------------------------------ summaries


def summarise(task: Task, run: dict, at_step: int | None = None) -> dict:
    """Mean and standard deviation over seeds of the metric (final or at ``at_step``), and steps to the target."""
    curve = run["curve"]
    row = curve[-1] if at_step is None else next(c for c in curve if c[0] == at_step)
    values = np.asarray(row[1])
    reached = []
    for seed in range(values.size):
        hit = next(
            (s for s, m in curve if (m[seed] <= task.target if task.lower_is_better else m[seed] >= task.target)),
            None,
        )
        reached.append(hit)
    return {
        "step": row[0],
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "per_seed": values.tolist(),
        "steps_to_target": reached,
    }


def _reached_text(reached: list) -> str:
    hits = [s for s in reached if s is not None]
    if not hits:
        return f"none of {len(reached)}"
    mean = f"{statistics.mean(hits):.0f}"
    return mean if len(hits) == len(reached) else f"{mean} ({len(hits)} of {len(reached)} seeds)"


def _fmt(task: Task, s: dict) -> str:
    if task.metric == "test MSE":
        return f"{s['mean']:.2e} ± {s['std']:.1e}"
    if "accuracy" in task.metric:
        return f"{100 * s['mean']:.1f}% ± {100 * s['std']:.1f}"
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def write_markdown(results: dict, path: pathlib.Path) -> None:
    lines = [
        "# The output-map cell against the classic cell",
        "",
        f"`python benchmarks/quality.py{' --quick' if results['quick'] else ''}`: {results['machine']}, "
        f"jax {results['jax']}, {results['seeds']} seeds per cell (mean ± standard deviation over seeds); "
        "cost per step: one seed, medians of alternating rounds.",
        "",
        "| task | cell | steps | held-out metric | steps to target (mean over seeds that reach it) "
        "| ms per step | cost vs classic |",
        "|---|---|---:|---|---|---:|---:|",
    ]
    for r in results["tasks"].values():
        cost = r["cost_s"]
        for label, s in r["rows"]:
            cell = "classic" if label.startswith("classic") else "output map"
            lines.append(
                f"| {r['title']} | {label} | {s['step']} | {s['formatted']} | "
                f"{r['target_text']}: {s['reached_text']} | {1e3 * cost[cell]:.1f} | "
                f"{cost[cell] / cost['classic']:.2f} |"
            )
    lines += ["", "Baselines (a model that ignores its input) and settings:", ""]
    for r in results["tasks"].values():
        lines.append(f"- {r['title']}: baseline {r['baseline_text']}; {r['notes']}.")
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["tasks"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = results["tasks"][name]
        for label, run in r["runs"].items():
            steps = [s for s, _ in run["curve"]]
            values = np.asarray([m for _, m in run["curve"]])
            line = ax.plot(steps, values.mean(1), label=label)[0]
            ax.fill_between(steps, values.min(1), values.max(1), color=line.get_color(), alpha=0.2)
        ax.axhline(r["baseline"], color="k", ls="--", lw=1, label="ignores the input")
        ax.axhline(r["target"], color="r", ls=":", lw=1, label="target")
        if r["metric"] == "test MSE":
            ax.set_yscale("log")
        ax.set_title(r["title"], fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel(r["metric"])
        ax.legend(fontsize=7)
    fig.suptitle("output-map cell vs classic cell: mean over seeds, band = min to max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------ the study


def build_tasks(quick: bool) -> dict[str, Callable[[], Task]]:
    def s(full, q):
        return q if quick else full

    return {
        "adding100": lambda: adding_task(s(100, 20), s(2000, 4), quick),
        "adding500": lambda: adding_task(s(500, 40), s(1200, 4), quick),
        "xor": lambda: xor_task(s(30, 20), s(2000, 4), quick),
        "charlm": lambda: charlm_task(s(1200, 4), quick),
        "vowels": lambda: vowels_task(s(600, 4), quick),
    }


def run_study(only: list[str] | None, quick: bool, seeds: int, out: pathlib.Path, log=print) -> dict:
    makers = build_tasks(quick)
    unknown = sorted(set(only or []) - set(makers))
    if unknown:
        raise SystemExit(f"quality.py: unknown task(s) {', '.join(unknown)}; choose from {', '.join(makers)}")
    results: dict[str, Any] = {
        "quick": quick,
        "seeds": seeds,
        "jax": jax.__version__,
        "machine": f"{platform.machine()}, {jax.devices()[0].platform}, {jax.device_count()} device(s)",
        "tasks": {},
    }
    rounds, inner = (1, 1) if quick else (7, 5)
    for name, make in makers.items():
        if only and name not in only:
            continue
        task = make()
        trainers = {cell: Trainer(task, ot, seeds) for cell, ot in CELLS.items()}
        log(f"{task.title}: timing a step of each cell")
        cost = step_costs(trainers, rounds, inner)
        classic_steps = None
        if name == "charlm":  # equal wall-clock: the classic cell gets the steps the output-map cell's time buys
            classic_steps = max(task.steps, round(task.steps * cost["output map"] / cost["classic"]))
        task_runs: dict[str, dict] = {}
        rows = []
        for cell, tr in trainers.items():
            steps = classic_steps if (classic_steps and cell == "classic") else task.steps
            log(f"{task.title}: {cell} cell, {seeds} seeds, {steps} steps")
            task_runs[cell] = tr.run(steps, log=log, also_at=task.steps)
        if name == "charlm" and not quick:
            for init_name, init in W_O_INITS.items():
                label = f"output map, W_o {init_name}"
                log(f"{task.title}: {label}, {seeds} seeds, {task.steps} steps")
                task_runs[label] = trainers["output map"].run(task.steps, output_init=init, log=log)
        for label, run in task_runs.items():
            if label == "classic" and classic_steps:
                rows.append(("classic (equal steps)", summarise(task, run, task.steps)))
                rows.append(("classic (equal time)", summarise(task, run)))
            else:
                rows.append((label, summarise(task, run)))
        for _, s in rows:
            s["formatted"] = _fmt(task, s)
            s["reached_text"] = _reached_text(s["steps_to_target"])
        target = f"{100 * task.target:.1f}%" if "accuracy" in task.metric else f"{task.target:g}"
        baseline = f"{100 * task.baseline:.1f}%" if "accuracy" in task.metric else f"{task.baseline:.3f}"
        results["tasks"][name] = {
            "title": task.title,
            "metric": task.metric,
            "target": task.target,
            "target_text": f"{'≤' if task.lower_is_better else '≥'} {target}",
            "baseline": task.baseline,
            "baseline_text": f"{task.metric} {baseline}",
            "notes": task.notes,
            "cost_s": cost,
            "rows": rows,
            "runs": task_runs,
        }
        results = save(results, out)  # each finished task is kept, whatever happens to the next
    return results


def save(results: dict, out: pathlib.Path) -> dict:
    """Write ``quality.{json,md,png}``, keeping the tasks of an earlier run (of the same mode) that this one
    did not rerun (``--only``); a lock serialises runs that finish together."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".quality.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = out / "quality.json"
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            earlier = None
        if earlier and earlier.get("quick") == results["quick"] and earlier.get("seeds") == results["seeds"]:
            results = dict(results, tasks={**earlier["tasks"], **results["tasks"]})
        order = list(build_tasks(results["quick"]))
        results["tasks"] = {name: results["tasks"][name] for name in order if name in results["tasks"]}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(path)
        write_markdown(results, out / "quality.md")
        plot(results, out / "quality.png")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: small models, a few steps (default: off)")
    p.add_argument("--only", nargs="+", metavar="TASK", help="run only these tasks (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell (default: 3)")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS, help="where to write quality.{md,json,png}")
    a = p.parse_args(argv)
    if a.seeds < 2:
        p.error(f"--seeds must be at least 2 (a standard deviation needs two), not {a.seeds}")
    t0 = time.perf_counter()
    try:
        run_study(a.only, a.quick, a.seeds, a.out, log=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        print(f"quality.py: interrupted; the tasks finished before are in {a.out}/quality.json", file=sys.stderr)
        return 130
    print(f"wrote {a.out}/quality.md, quality.json and quality.png in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
