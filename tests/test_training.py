"""Training utilities: losses, the fit loop, checkpoints and resume, NaN guard, sharding, the CLI."""

import json
import math
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlstm
import jaxlstm.linen as jl
from jaxlstm import training

pytestmark = pytest.mark.usefixtures("peer_promotion")  # optax and orbax run here too


# ------------------------------------------------------------------ losses


def test_sequence_cross_entropy_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7))
    targets = rng.integers(0, 7, size=(3, 5))
    lengths = np.array([5, 2, 0])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    valid = np.arange(5)[None] < lengths[:, None]
    expected = -(picked * valid).sum() / valid.sum()
    got = training.sequence_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), seq_lengths=jnp.asarray(lengths))
    np.testing.assert_allclose(got, expected, rtol=1e-6)  # computed in float32
    np.testing.assert_allclose(training.to_bits(got), expected / math.log(2), rtol=1e-6)
    with_mask = training.sequence_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), mask=jnp.asarray(valid))
    np.testing.assert_allclose(with_mask, got, rtol=1e-7)


def test_masked_mse_against_numpy():
    rng = np.random.default_rng(1)
    p, t = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 3))
    valid = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
    expected = (((p - t) ** 2).mean(-1) * valid).sum() / valid.sum()
    np.testing.assert_allclose(training.masked_mse(p, t, seq_lengths=jnp.array([3, 1])), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="mask must have shape"):
        training.masked_mse(p, t, mask=jnp.ones((2, 3)))


# ------------------------------------------------------------------ a small stateful model for the loop


class TinyStreamModel(nn.Module):
    """LSTM with recurrent dropout + Dense, predicting the next value of a stream (uses rng and a carry)."""

    @nn.compact
    def __call__(self, xs, carry, rng):
        ys, states = jl.LSTM(8, recurrent_dropout_rate=0.2)(
            xs, carry, deterministic=False, return_state=True
        ) if rng is not None else (None, None)
        return nn.Dense(1)(ys), states


def stream_batch_fn(step, B=4, T=10):
    """Contiguous chunks of B sine streams: step k holds positions [k T, (k + 1) T] (TBPTT)."""
    t = (step * T + np.arange(T + 1))[None, :] * 0.3 + np.arange(B)[:, None]
    return jnp.asarray(np.sin(t)[..., None], jnp.float32)


def stream_loss(params, state, batch, rng, carry):
    preds, new_carry = state.apply_fn({"params": params}, batch[:, :-1], carry, rng, rngs={"dropout": rng})
    loss = training.masked_mse(preds, batch[:, 1:])
    return loss, ({}, new_carry)


def new_state(lr=1e-2):
    model = TinyStreamModel()
    params = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, stream_batch_fn(0)[:, :-1], None, jax.random.key(2))["params"]
    return training.TrainState.create(apply_fn=model.apply, params=params, tx=training.default_optimizer(lr, total_steps=30))


def zero_carry():
    z = jnp.zeros((4, 8), jnp.float32)
    return (jaxlstm.LSTMState(z, z),)


def run_fit(tmp, num_steps, **kw):
    return training.fit(
        new_state(),
        training.make_train_step(stream_loss),
        stream_batch_fn,
        num_steps=num_steps,
        rng=jax.random.key(7),
        carry=zero_carry(),
        checkpoint_dir=tmp,
        save_every=4,
        keep=2,
        progress=False,
        log_every=1,
        **kw,
    )


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_fit_learns_and_writes_metrics(tmp_path):
    res = run_fit(tmp_path / "ck", 30, metrics_path=tmp_path / "m.jsonl")
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 31))
    steps = sorted(int(p.name) for p in (tmp_path / "ck").iterdir() if p.name.isdigit())
    assert steps == [28, 30]  # saved every 4 steps and at the end, last 2 kept


def test_resume_is_bit_exact(tmp_path):
    straight = run_fit(tmp_path / "a", 14)
    run_fit(tmp_path / "b", 6)  # stop early (checkpoint at 4 and the final at 6) ...
    resumed = run_fit(tmp_path / "b", 14)  # ... and continue
    assert int(resumed.state.step) == 14
    assert_same_params(resumed.state.params, straight.state.params)
    assert_same_params(resumed.state.opt_state, straight.state.opt_state)
    assert_same_params(resumed.carry, straight.carry)
    tail = lambda r: [h["loss"] for h in r.history if h["step"] > 6]
    assert tail(resumed) == tail(straight)


def test_ctrl_c_saves_and_resumes_exactly(tmp_path):
    straight = run_fit(tmp_path / "a", 12)

    def interrupting(step):
        if step == 5:
            raise KeyboardInterrupt
        return stream_batch_fn(step)

    res = training.fit(
        new_state(), training.make_train_step(stream_loss), interrupting, num_steps=12, rng=jax.random.key(7),
        carry=zero_carry(), checkpoint_dir=tmp_path / "b", save_every=4, progress=False,
    )
    assert res.interrupted and int(res.state.step) == 5
    assert (tmp_path / "b" / "5").exists()
    resumed = run_fit(tmp_path / "b", 12)
    assert_same_params(resumed.state.params, straight.state.params)


def test_nan_guard_names_the_step_and_keeps_last_good_checkpoint(tmp_path):
    def poisoned(step):
        batch = stream_batch_fn(step)
        return batch * jnp.nan if step == 6 else batch

    with pytest.raises(training.NonFiniteLossError, match="at step 6"):
        training.fit(
            new_state(), training.make_train_step(stream_loss), poisoned, num_steps=10, rng=jax.random.key(7),
            carry=zero_carry(), checkpoint_dir=tmp_path, save_every=4, progress=False,
        )
    ck = training.Checkpointer(tmp_path)
    assert ck.latest_step() == 6  # 6 good updates (steps 0-5), saved on the way out
    snap = ck.restore(None, training._snapshot(new_state(), jax.random.key(0), zero_carry()))
    ck.close()
    assert all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(snap["train_state"]))


SHARDED_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
import jaxlstm.linen as jl
from jaxlstm import training
import flax.linen as nn

class M(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5)(jl.LSTM(16, num_layers=2)(x))

def batch_fn(step):
    k = jax.random.fold_in(jax.random.key(3), step)
    return jax.random.normal(k, (8, 12, 3), jnp.float32)

def loss(params, state, batch, rng, carry):
    y = state.apply_fn({"params": params}, batch)
    return jnp.mean((y - batch[..., :1]) ** 2), ({}, None)

model = M()
params = model.init(jax.random.key(0), batch_fn(0))["params"]
results = {}
for name, mesh in (("single", None), ("sharded", training.data_mesh())):
    st = training.TrainState.create(apply_fn=model.apply, params=params, tx=training.default_optimizer(1e-2, total_steps=8))
    res = training.fit(st, training.make_train_step(loss, donate=False), batch_fn, num_steps=8,
                       rng=jax.random.key(1), progress=False, log_every=1, mesh=mesh)
    results[name] = [h["loss"] for h in res.history]
print(json.dumps(dict(devices=jax.device_count(), **results)))
"""


def test_data_parallel_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["devices"] == 4
    # documented tolerance: reductions split over devices sum in another order
    np.testing.assert_allclose(res["sharded"], res["single"], rtol=1e-5)
    assert res["single"][-1] < res["single"][0]


# ------------------------------------------------------------------ the command line


def cli(*args):
    from jaxlstm._cli import main

    return main(list(args))


def test_cli_train_resume_generate(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question. " * 40, encoding="utf-8")
    out = tmp_path / "run"
    common = ["--text", str(text), "--out", str(out), "--seq-len", "16", "--batch-size", "4", "--hidden-size", "16",
              "--embed-dim", "8", "--eval-every", "3", "--save-every", "3", "--no-progress"]
    assert cli("train", "--steps", "6", *common) == 0
    for name in ("config.json", "metrics.jsonl", "loss.png", "sample.txt"):
        assert (out / name).exists(), name
    printed = capsys.readouterr().out
    assert "held-out" in printed and "bits/char" in printed and "sample:" in printed
    # an existing run needs --resume or --overwrite
    assert cli("train", "--steps", "6", *common) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli("train", "--steps", "9", "--resume", *common) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 9
    capsys.readouterr()
    assert cli("generate", "--checkpoint", str(out), "--prompt", "to be", "--length", "20") == 0
    sample = capsys.readouterr().out
    assert sample.startswith("to be") and len(sample.rstrip("\n")) >= 25


def test_cli_errors(tmp_path, capsys):
    def err(*args):
        assert cli(*args) == 2
        return capsys.readouterr().err

    assert "not found" in err("train", "--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert "empty" in err("train", "--text", str(empty), "--out", str(tmp_path / "r2"))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    assert "not UTF-8" in err("train", "--text", str(latin), "--out", str(tmp_path / "r3"))
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 3)
    assert "longer than the training text" in err("train", "--text", str(short), "--seq-len", "64", "--out", str(tmp_path / "r4"))
    assert "not found" in err("generate", "--checkpoint", str(tmp_path / "nothing"))
    (tmp_path / "notarun").mkdir()
    assert "no config.json" in err("generate", "--checkpoint", str(tmp_path / "notarun"))


def test_cli_incompatible_checkpoint(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("abcdefg hijklmn " * 50)
    out = tmp_path / "run"
    assert cli("train", "--text", str(text), "--out", str(out), "--steps", "2", "--seq-len", "8", "--batch-size", "2",
               "--hidden-size", "8", "--embed-dim", "4", "--no-progress") == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["hidden_size"] = 12  # the checkpoint no longer fits the described model
    (out / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert cli("generate", "--checkpoint", str(out)) == 2
    assert "does not fit the model" in capsys.readouterr().err
