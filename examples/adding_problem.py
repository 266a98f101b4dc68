"""The adding problem (Hochreiter & Schmidhuber, 1997): a learning check for long-term memory.

    python examples/adding_problem.py                 # T = 100, up to 6000 Adam steps
    python examples/adding_problem.py --classic       # the classic cell
    python examples/adding_problem.py --forget-bias 0 # without the forget-gate bias

Each input step is a pair (value ~ U[0, 1], marker); exactly two steps are
marked, one in each half of the sequence. The target is the sum of the two
marked values. A model that ignores the input can do no better than predicting
the mean, 1.0, whose MSE is Var(u1 + u2) = 1/6 ~ 0.167. The LSTM reads the
whole sequence and a Dense layer maps its final hidden state to the answer.

Trains with Adam (lr 1e-3, batch 64, global-norm clipping 1.0) through
:func:`jaxlstm.training.fit`, evaluates the MSE on 2048 fixed test sequences
every ``--eval-every`` steps, and writes ``adding_T{T}.json`` (the learning
curve and the final figure) and ``adding_T{T}.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxlstm.linen as jl
from jaxlstm import training

BASELINE_MSE = 1.0 / 6.0


def adding_batch(key, batch: int, T: int):
    """``(xs (B, T, 2), targets (B,))``."""
    kv, k1, k2 = jax.random.split(key, 3)
    values = jax.random.uniform(kv, (batch, T))
    first = jax.random.randint(k1, (batch,), 0, T // 2)
    second = jax.random.randint(k2, (batch,), T // 2, T)
    steps = jnp.arange(T)[None, :]
    marks = ((steps == first[:, None]) | (steps == second[:, None])).astype(jnp.float32)
    return jnp.stack([values, marks], axis=-1), jnp.sum(values * marks, axis=1)


class AddingModel(nn.Module):
    hidden_size: int = 64
    output_transform: bool = True
    forget_bias: float = 1.0

    @nn.compact
    def __call__(self, xs):
        _, states = jl.LSTM(self.hidden_size, output_transform=self.output_transform, forget_bias=self.forget_bias)(
            xs, return_state=True
        )
        return nn.Dense(1)(states[-1].hidden)[:, 0]


def run(
    T=100,
    steps=6000,
    batch=64,
    lr=1e-3,
    hidden=64,
    classic=False,
    forget_bias=1.0,
    seed=0,
    eval_every=200,
    progress=True,
):
    """Train on the adding problem; returns a dict with the learning curve and the final test MSE."""
    model = AddingModel(hidden, output_transform=not classic, forget_bias=forget_bias)
    key = jax.random.key(seed)
    params = model.init(key, jnp.zeros((1, T, 2)))["params"]
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
    state = training.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    data_key = jax.random.fold_in(key, 1)
    test_x, test_y = adding_batch(jax.random.fold_in(key, 2), 2048, T)

    def batch_fn(step):
        return adding_batch(jax.random.fold_in(data_key, step), batch, T)

    def loss_fn(params, state, b, rng, carry):
        xs, ys = b
        return jnp.mean((state.apply_fn({"params": params}, xs) - ys) ** 2), ({}, None)

    test_mse = jax.jit(lambda p: jnp.mean((model.apply({"params": p}, test_x) - test_y) ** 2))
    t0 = time.perf_counter()
    result = training.fit(
        state,
        training.make_train_step(loss_fn),
        batch_fn,
        num_steps=steps,
        rng=key,
        eval_fn=lambda s: {"mse": test_mse(s.params)},
        eval_every=eval_every,
        progress=progress,
        log_every=50,
    )
    curve = [(h["step"], h["eval_mse"]) for h in result.history if "eval_mse" in h]
    solved = next((s for s, m in curve if m < 0.01), None)
    return dict(
        T=T,
        steps=steps,
        batch=batch,
        lr=lr,
        hidden=hidden,
        cell="classic" if classic else "seed",
        forget_bias=forget_bias,
        seed=seed,
        baseline_mse=BASELINE_MSE,
        final_test_mse=curve[-1][1],
        first_step_below_0_01=solved,
        wall_s=time.perf_counter() - t0,
        curve=curve,
        train_loss=[(h["step"], h["loss"]) for h in result.history if "loss" in h],
    )


def plot(results: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        s, m = zip(*r["curve"])
        ax.semilogy(s, m, label=f"{r['cell']} cell, forget bias {r['forget_bias']:g}")
    ax.axhline(BASELINE_MSE, color="k", ls="--", lw=1, label="predict the mean (0.167)")
    ax.axhline(0.01, color="r", ls=":", lw=1, label="0.01")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("test MSE")
    ax.set_title(f"Adding problem, T = {results[0]['T']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=100)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--classic", action="store_true")
    p.add_argument("--forget-bias", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    a = p.parse_args(argv)
    r = run(a.T, a.steps, a.batch, a.lr, a.hidden, a.classic, a.forget_bias, a.seed, a.eval_every)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = (
        f"adding_T{a.T}" + ("_classic" if a.classic else "") + (f"_fb{a.forget_bias:g}" if a.forget_bias != 1.0 else "")
    )
    (a.out / f"{stem}.json").write_text(json.dumps(r, indent=1))
    plot([r], a.out / f"{stem}.png")
    print(
        f"adding problem T={a.T}: final test MSE {r['final_test_mse']:.5f} (baseline {BASELINE_MSE:.3f}); "
        f"first below 0.01 at step {r['first_step_below_0_01']}; {r['wall_s']:.0f} s. Wrote {a.out / stem}.json/.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
