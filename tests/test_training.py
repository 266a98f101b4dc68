"""Training utilities: losses, the fit loop, checkpoints and resume, the non-finite guard, signals, sharding."""

import functools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlstm
import jaxlstm.linen as jl
from jaxlstm import training

# optax and orbax run here too; every test here runs the loop or its pieces end to end: the slow tier (CI)
pytestmark = [pytest.mark.usefixtures("peer_promotion"), pytest.mark.slow]


# ------------------------------------------------------------------ a small stateful model for the loop


class TinyStreamModel(nn.Module):
    """LSTM with recurrent dropout + Dense, predicting the next value of a stream (uses rng and a carry)."""

    @nn.compact
    def __call__(self, xs, carry, rng):
        ys, states = (
            jl.LSTM(8, recurrent_dropout_rate=0.2)(xs, carry, deterministic=False, return_state=True)
            if rng is not None
            else (None, None)
        )
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
    params = model.init(
        {"params": jax.random.key(0), "dropout": jax.random.key(1)}, stream_batch_fn(0)[:, :-1], None, jax.random.key(2)
    )["params"]
    return training.TrainState.create(
        apply_fn=model.apply, params=params, tx=training.default_optimizer(lr, total_steps=30)
    )


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


@functools.cache
def straight_run(num_steps):
    """An uninterrupted run, computed once per length for the resume tests that compare against it."""
    with jax.enable_x64(True):
        return run_fit(pathlib.Path(tempfile.mkdtemp()) / "straight", num_steps)


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------ the loop


@pytest.mark.slow  # several fits with real orbax checkpoints
def test_fit_learns_and_writes_metrics(tmp_path):
    res = run_fit(tmp_path / "ck", 30, metrics_path=tmp_path / "m.jsonl")
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 31))
    steps = sorted(int(p.name) for p in (tmp_path / "ck").iterdir() if p.name.isdigit())
    assert steps == [28, 30]  # saved every 4 steps and at the end, last 2 kept


@pytest.mark.slow  # several fits with real orbax checkpoints
def test_resume_is_bit_exact(tmp_path):
    straight = straight_run(14)
    run_fit(tmp_path / "b", 6)  # stop early (checkpoint at 4 and the final at 6) ...
    resumed = run_fit(tmp_path / "b", 14)  # ... and continue
    assert int(resumed.state.step) == 14
    assert_same_params(resumed.state.params, straight.state.params)
    assert_same_params(resumed.state.opt_state, straight.state.opt_state)
    assert_same_params(resumed.carry, straight.carry)
    tail = lambda r: [h["loss"] for h in r.history if h["step"] > 6]
    assert tail(resumed) == tail(straight)


@pytest.mark.slow  # several fits with real orbax checkpoints
def test_ctrl_c_saves_and_resumes_exactly(tmp_path):
    straight = straight_run(12)

    def interrupting(step):
        if step == 5:
            raise KeyboardInterrupt
        return stream_batch_fn(step)

    res = training.fit(
        new_state(),
        training.make_train_step(stream_loss),
        interrupting,
        num_steps=12,
        rng=jax.random.key(7),
        carry=zero_carry(),
        checkpoint_dir=tmp_path / "b",
        save_every=4,
        progress=False,
    )
    assert res.interrupted and int(res.state.step) == 5
    assert (tmp_path / "b" / "5").exists()
    resumed = run_fit(tmp_path / "b", 12)
    assert_same_params(resumed.state.params, straight.state.params)


def test_nan_guard_names_the_step_and_keeps_last_good_checkpoint(tmp_path):
    def poisoned(step):
        batch = stream_batch_fn(step)
        return batch * jnp.nan if step == 6 else batch

    with pytest.raises(training.NonFiniteLossError, match="from batch 6"):
        training.fit(
            new_state(),
            training.make_train_step(stream_loss),
            poisoned,
            num_steps=10,
            rng=jax.random.key(7),
            carry=zero_carry(),
            checkpoint_dir=tmp_path,
            save_every=4,
            progress=False,
        )
    ck = training.Checkpointer(tmp_path)
    assert ck.latest_step() == 6  # 6 good updates (steps 0-5), saved on the way out
    _, snap = ck.restore(None, training.snapshot(new_state(), jax.random.key(0), zero_carry()))
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
    tx = training.default_optimizer(1e-2, total_steps=8)
    st = training.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    res = training.fit(st, training.make_train_step(loss, donate=False), batch_fn, num_steps=8,
                       rng=jax.random.key(1), progress=False, log_every=1, mesh=mesh)
    results[name] = [h["loss"] for h in res.history]
print(json.dumps(dict(devices=jax.device_count(), **results)))
"""


@pytest.mark.slow  # a subprocess with 4 simulated devices
def test_data_parallel_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["devices"] == 4
    # documented tolerance: reductions split over devices sum in another order
    np.testing.assert_allclose(res["sharded"], res["single"], rtol=1e-5)
    assert res["single"][-1] < res["single"][0]


# ------------------------------------------------------------------ faults in the loop


def test_non_finite_gradients_with_a_finite_loss_are_caught_at_their_step(tmp_path):
    """A NaN that reaches only the gradients: caught at its own step, never applied, never saved."""

    @jax.custom_vjp
    def zero_with_nan_grad(x, flag):  # adds 0 to the loss; its gradient is NaN where flag > 0
        return jnp.sum(x) * 0.0

    def fwd(x, flag):
        return jnp.sum(x) * 0.0, flag

    def bwd(flag, g):
        return jnp.where(flag > 0, jnp.nan, 0.0).astype(jnp.float32) * jnp.ones((1,), jnp.float32), jnp.zeros_like(flag)

    zero_with_nan_grad.defvjp(fwd, bwd)

    def nan_grads_loss(params, state, batch, rng, carry):
        loss, aux = stream_loss(params, state, batch, rng, carry)
        flag = (batch[0, 0, 0] > 10.0).astype(batch.dtype)
        return loss + zero_with_nan_grad(params["Dense_0"]["bias"], flag), aux

    def batch_fn(step):
        b = stream_batch_fn(step)
        return b.at[0, 0, 0].set(100.0) if step == 6 else b

    with pytest.raises(training.NonFiniteLossError, match=r"update 7 \(from batch 6\).*gradient norm nan"):
        training.fit(
            new_state(),
            training.make_train_step(nan_grads_loss),
            batch_fn,
            num_steps=10,
            rng=jax.random.key(7),
            carry=zero_carry(),
            checkpoint_dir=tmp_path,
            save_every=4,
            progress=False,
        )
    ck = training.Checkpointer(tmp_path)
    assert ck.all_steps() == [4, 6]
    step, snap = ck.restore(None, training.snapshot(new_state(), jax.random.key(0), zero_carry()))
    ck.close()
    assert step == 6 and all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(snap["train_state"]))


def test_nan_learning_rate_is_never_applied(tmp_path):
    state = new_state()
    state = state.replace(tx=optax.adam(float("nan")), opt_state=optax.adam(float("nan")).init(state.params))
    step = training.make_train_step(stream_loss, donate=False)
    new, metrics, _ = step(state, stream_batch_fn(0), jax.random.key(0), zero_carry())
    assert not bool(metrics["finite"]) and bool(jnp.isfinite(metrics["loss"]))
    assert_same_params(new.params, state.params)


def test_checkpointer_refuses_non_finite_values(tmp_path):
    ck = training.Checkpointer(tmp_path)
    with pytest.raises(ValueError, match="refusing to save step 3: it holds NaN"):
        ck.save(3, {"w": jnp.array([1.0, jnp.nan])}, force=True)
    assert ck.all_steps() == []
    ck.close()


def _damage(step_dir: pathlib.Path):
    for f in (x for x in (step_dir / "state").rglob("*") if x.is_file() and x.stat().st_size > 64):
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x55
        f.write_bytes(bytes(data))


def test_a_checkpoint_whose_values_changed_but_still_read_is_refused_by_its_digest(tmp_path):
    """Damage orbax cannot see: the arrays of step 2 replaced by other values of the same names, shapes
    and dtypes (a well-formed checkpoint written elsewhere), its metadata and digest left as they were.
    Only the comparison of the digest with the values read back can refuse it."""
    tree = {"w": jnp.arange(1000.0), "n": jnp.int32(3)}
    ck = training.Checkpointer(tmp_path / "run", keep=5)
    for s in (1, 2):
        ck.save(s, jax.tree.map(lambda a: a + s, tree), force=True)
    ck.close()
    other = training.Checkpointer(tmp_path / "other", keep=5)
    changed = {"w": tree["w"].at[500].add(0.25) + 2, "n": tree["n"] + 2}  # one value of step 2 differs
    other.save(2, changed, force=True)
    other.close()
    shutil.rmtree(tmp_path / "run" / "2" / "state")
    shutil.copytree(tmp_path / "other" / "2" / "state", tmp_path / "run" / "2" / "state")
    ck = training.Checkpointer(tmp_path / "run", keep=5, read_only=True)
    # the changed arrays do read: orbax alone would restore them
    raw = ck._manager.restore(2, args=ck._ocp.args.Composite(state=ck._ocp.args.StandardRestore(tree)))
    assert float(raw["state"]["w"][500]) == 502.25
    notes = []
    step, got = ck.restore(None, tree, on_fallback=notes.append)
    assert step == 1 and float(got["w"][500]) == 501.0
    assert notes == [
        "checkpoint 2 is damaged (its data does not match the checksum written with it); trying an earlier one"
    ]
    with pytest.raises(training.CheckpointError, match="checkpoint 2 is damaged: its data does not match the checksum"):
        ck.restore(2, tree)
    ck.close()


# orbax leaves coroutines behind when the read of a damaged checkpoint fails ("Event loop is closed"
# when they are collected); the checkpoint is reported and skipped all the same
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoints_are_skipped_and_reported(tmp_path):
    tree = {"w": jnp.arange(1000.0), "n": jnp.int32(3)}
    ck = training.Checkpointer(tmp_path, keep=5)
    for s in (1, 2, 3):
        ck.save(s, jax.tree.map(lambda a: a + s, tree), force=True)
    ck.close()
    _damage(tmp_path / "3")
    ck = training.Checkpointer(tmp_path, keep=5, read_only=True)
    notes = []
    step, got = ck.restore(None, tree, on_fallback=notes.append)
    assert step == 2 and float(got["w"][1]) == 3.0
    assert len(notes) == 1 and notes[0].startswith("checkpoint 3 is damaged")
    with pytest.raises(training.CheckpointError, match="checkpoint 2 holds .* written by another model"):
        ck.restore(None, {"w": jnp.zeros(5), "n": jnp.int32(0)})
    _damage(tmp_path / "2")
    shutil.rmtree(tmp_path / "1" / "state")  # a partial checkpoint
    with pytest.raises(training.CheckpointError, match="no intact checkpoint") as info:
        ck.restore(None, tree)
    assert "checkpoint 1 is damaged" in str(info.value) and "\n" not in str(info.value)
    ck.close()


# orbax leaves coroutines behind when the read of a damaged checkpoint fails ("Event loop is closed"
# when they are collected); the checkpoint is reported and skipped all the same
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.slow  # several fits with real orbax checkpoints
def test_resume_falls_back_past_a_damaged_checkpoint_and_stays_exact(tmp_path):
    straight = straight_run(14)
    run_fit(tmp_path / "b", 10)  # checkpoints 8 and 10 (keep=2)
    _damage(tmp_path / "b" / "10")
    resumed = run_fit(tmp_path / "b", 14)
    assert (tmp_path / "b.damaged" / "10").is_dir()
    assert_same_params(resumed.state.params, straight.state.params)
    assert_same_params(resumed.state.opt_state, straight.state.opt_state)


@pytest.mark.slow  # several fits with real orbax checkpoints
def test_metrics_are_cut_back_and_a_missed_evaluation_is_redone(tmp_path):
    """After a stop, metrics.jsonl equals an uninterrupted run's: later rows go, a cut-off evaluation is rerun."""
    evals = lambda state: {"norm": optax.tree.norm(state.params)}
    kw = dict(eval_fn=evals, eval_every=4)
    run_fit(tmp_path / "a", 12, metrics_path=tmp_path / "a.jsonl", **kw)
    run_fit(tmp_path / "b", 8, metrics_path=tmp_path / "b.jsonl", **kw)
    lines = (tmp_path / "b.jsonl").read_text().splitlines()
    # as if killed after checkpoint 8 but before its evaluation, with two more rows and half a line written
    lines = [x for x in lines if not ('"step": 8' in x and "eval_" in x)]
    lines += [json.dumps({"step": 9, "loss": 1.0}), json.dumps({"step": 10, "loss": 1.0}), '{"step": 11, "lo']
    (tmp_path / "b.jsonl").write_text("\n".join(lines))
    run_fit(tmp_path / "b", 12, metrics_path=tmp_path / "b.jsonl", **kw)

    def rows(name):
        return [
            {k: v for k, v in json.loads(x).items() if k != "time_s"}
            for x in (tmp_path / name).read_text().splitlines()
        ]

    assert rows("b.jsonl") == rows("a.jsonl")


@pytest.mark.slow  # several fits with real orbax checkpoints
def test_keyboard_interrupt_while_the_state_is_donated_keeps_the_last_checkpoint(tmp_path):
    """A Ctrl-C that lands after the step consumed (donated) the state: nothing broken is saved, step 4 stays."""
    real = training.make_train_step(stream_loss)
    calls = []

    def step(state, batch, rng, carry):
        out = real(state, batch, rng, carry)
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # the old state is donated; the new one never reached fit
        return out

    with pytest.raises(KeyboardInterrupt):
        training.fit(
            new_state(),
            step,
            stream_batch_fn,
            num_steps=12,
            rng=jax.random.key(7),
            carry=zero_carry(),
            checkpoint_dir=tmp_path,
            save_every=4,
            progress=False,
        )
    ck = training.Checkpointer(tmp_path)
    assert ck.all_steps() == [4]
    ck.close()


@pytest.mark.slow  # several fits with real orbax checkpoints
def test_a_signal_stops_after_the_step_in_flight_which_is_saved(tmp_path):
    """SIGINT/SIGTERM set a flag: the step in flight completes and is saved, and the run resumes exactly."""
    straight = straight_run(12)

    def signalling(sig):
        def batch_fn(step):
            if step == 5:
                os.kill(os.getpid(), sig)
            return stream_batch_fn(step)

        return batch_fn

    before = signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGTERM,):  # SIGINT takes the same path (and is sent to a real process in the fault tests)
        out = tmp_path / signal.Signals(sig).name
        res = training.fit(
            new_state(),
            training.make_train_step(stream_loss),
            signalling(sig),
            num_steps=12,
            rng=jax.random.key(7),
            carry=zero_carry(),
            checkpoint_dir=out,
            save_every=4,
            progress=False,
        )
        assert res.interrupted and int(res.state.step) == 6
        assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
        resumed = run_fit(out, 12)
        assert_same_params(resumed.state.params, straight.state.params)


@pytest.fixture
def sigint_delivered():
    """SIGINT handled as Python's default, whatever the suite was started with: a shell starts a
    background job with SIGINT ignored, and fit keeps an ignored signal ignored (as under nohup)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.slow  # several fits with real orbax checkpoints
@pytest.mark.usefixtures("sigint_delivered")
def test_a_second_signal_after_a_step_returned_keeps_its_metrics(tmp_path):
    """A double Ctrl-C whose second signal lands after a step returned but before its metrics were
    counted (it happened in the fault-injection runs: the resumed run's training record at the end of
    that logging window differed). The step and its bookkeeping finish first; then the state, its
    step and the partial logging window are saved together, and the resumed run writes the same
    records as a straight one."""
    straight = quick_fit(12, log_every=5, checkpoint_dir=tmp_path / "straight")
    step_fn = training.make_train_step(stream_loss)

    class Signalling(dict):  # the loop's first use of the metrics after the step returned
        def pop(self, *args):
            os.kill(os.getpid(), signal.SIGINT)  # stop after this step ...
            os.kill(os.getpid(), signal.SIGINT)  # ... no, at once
            return super().pop(*args)

    def train_step(state, batch, rng, carry):
        state, metrics, carry = step_fn(state, batch, rng, carry)
        return state, (Signalling(metrics) if int(state.step) == 7 else metrics), carry

    out = tmp_path / "run"
    res = training.fit(
        new_state(),
        train_step,
        stream_batch_fn,
        num_steps=12,
        rng=jax.random.key(7),
        carry=zero_carry(),
        checkpoint_dir=out,
        save_every=4,
        progress=False,
        log_every=5,
        metrics_path=tmp_path / "m.jsonl",
    )
    assert res.interrupted and int(res.state.step) == 7
    ck = training.Checkpointer(out)
    assert ck.latest_step() == 7  # the step in flight, with its metrics in the window
    ck.close()
    resumed = quick_fit(12, log_every=5, checkpoint_dir=out, resume=True, metrics_path=tmp_path / "m.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if k != "time_s"}
    assert [strip(r) for r in rows] == [strip(r) for r in straight.history]
    assert_same_params(resumed.state.params, straight.state.params)


# ------------------------------------------------------------------ logging, data sources, NNX, best and patience


def quick_fit(num_steps, batch_fn=stream_batch_fn, **kw):
    kw.setdefault("log_every", 1)
    return training.fit(
        new_state(),
        training.make_train_step(stream_loss),
        batch_fn,
        num_steps=num_steps,
        rng=jax.random.key(7),
        carry=zero_carry(),
        progress=False,
        **kw,
    )


def test_training_records_are_window_means_and_reach_on_record():
    per_step = [h["loss"] for h in quick_fit(10).history]
    seen = []
    res = quick_fit(10, log_every=4, on_record=seen.append)
    rows = res.history
    assert [r["step"] for r in rows] == [4, 8, 10]
    expected = [np.mean(per_step[0:4]), np.mean(per_step[4:8]), np.mean(per_step[8:10])]
    np.testing.assert_allclose([r["loss"] for r in rows], expected, rtol=1e-12)
    assert seen == rows  # the callback sees every record as written


def test_metrics_lines_are_strict_json():
    line = training.json_line({"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "lr": 0.5})

    def refuse(name):
        raise ValueError(f"bare {name} in a JSON line")

    assert json.loads(line, parse_constant=refuse) == {"step": 3, "loss": None, "grad_norm": None, "lr": 0.5}


def test_batches_from_reads_each_item_once_per_epoch_and_is_deterministic():
    items = [np.full(2, k, np.float32) for k in range(5)]
    for shuffle in (False, True):
        fn = training.batches_from(items, shuffle=shuffle, seed=3)
        order = [int(fn(s)[0]) for s in range(15)]
        for e in range(3):
            assert sorted(order[5 * e : 5 * e + 5]) == list(range(5))
        again = training.batches_from(items, shuffle=shuffle, seed=3)
        assert [int(again(s)[0]) for s in (12, 3, 7)] == [order[12], order[3], order[7]]  # any order of calls
    shuffled = training.batches_from(items, shuffle=True, seed=3)
    assert [int(shuffled(s)[0]) for s in range(5)] != [int(shuffled(s)[0]) for s in range(5, 10)]
    with pytest.raises(TypeError, match="needs __len__ and __getitem__"):
        training.batches_from(iter(items))
    with pytest.raises(ValueError, match="empty"):
        training.batches_from([])


def test_fit_reads_a_grain_map_dataset_as_batch_fn_would():
    import grain  # in the test extra

    batches = [np.asarray(stream_batch_fn(s)) for s in range(4)]
    source = grain.MapDataset.source(batches)
    by_source = quick_fit(6, batch_fn=source)
    by_fn = quick_fit(6, batch_fn=lambda s: jnp.asarray(batches[s % 4]))
    assert [h["loss"] for h in by_source.history] == [h["loss"] for h in by_fn.history]


def nnx_problem(lr=1e-2):
    from flax import nnx

    import jaxlstm.nnx as jn

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.lstm = jn.LSTM(1, 8, recurrent_dropout_rate=0.2, rngs=rngs)
            self.head = nnx.Linear(8, 1, rngs=rngs)

        def __call__(self, xs, rng):
            return self.head(self.lstm(xs, rngs=nnx.Rngs(dropout=rng)))

    model = Model(nnx.Rngs(0))
    state = training.nnx_train_state(model, training.default_optimizer(lr, total_steps=30))

    def loss(params, st, batch, rng, carry):
        preds = st.apply_fn(params, batch[:, :-1], rng)
        return training.masked_mse(preds, batch[:, 1:]), ({}, None)

    return model, state, training.make_train_step(loss)


def test_fit_trains_an_nnx_model():
    model, state, step = nnx_problem()
    before = float(stream_loss_nnx(model))
    res = training.fit(state, step, stream_batch_fn, num_steps=30, rng=jax.random.key(7), progress=False, log_every=1)
    losses = [h["loss"] for h in res.history]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    training.nnx_update(model, res.state)
    assert float(stream_loss_nnx(model)) < 0.5 * before
    # the NaN guard works on it too
    _, state, step = nnx_problem(lr=float("nan"))
    with pytest.raises(training.NonFiniteLossError, match="update 1 \\(from batch 0\\)"):
        training.fit(state, step, stream_batch_fn, num_steps=3, rng=jax.random.key(7), progress=False)


def stream_loss_nnx(model):
    batch = stream_batch_fn(100)
    model.eval()
    out = training.masked_mse(model.head(model.lstm(batch[:, :-1])), batch[:, 1:])
    model.train()
    return out


@pytest.mark.slow  # real orbax checkpoints
def test_nnx_fit_resumes_bit_exact(tmp_path):
    def run(where, num_steps, interrupt_at=None):
        _, state, step = nnx_problem()

        def batches(s):
            if s == interrupt_at:
                raise KeyboardInterrupt
            return stream_batch_fn(s)

        return training.fit(
            state,
            step,
            batches,
            num_steps=num_steps,
            rng=jax.random.key(7),
            checkpoint_dir=where,
            save_every=4,
            progress=False,
            log_every=3,
            metrics_path=where.with_suffix(".jsonl"),
        )

    straight = run(tmp_path / "a", 12)
    first = run(tmp_path / "b", 12, interrupt_at=7)
    assert first.interrupted
    resumed = run(tmp_path / "b", 12)
    assert_same_params(resumed.state.params, straight.state.params)
    assert_same_params(resumed.state.opt_state, straight.state.opt_state)
    # the logging window cut by the stop (steps 7-9) was carried in the checkpoint: the records match
    rows = lambda p: [{k: v for k, v in r.items() if k != "time_s"} for r in training.read_metrics(p)]
    assert rows(tmp_path / "b.jsonl") == rows(tmp_path / "a.jsonl")


def scripted_eval(values):
    calls = iter(values)
    return lambda state: {"loss": next(calls)}


@pytest.mark.slow  # real orbax checkpoints
def test_best_checkpoint_and_early_stopping(tmp_path):
    res = quick_fit(
        30,
        eval_fn=scripted_eval([3.0, 2.0, 2.5, 2.6, 2.7, 1.0]),
        eval_every=2,
        patience=3,
        best_dir=tmp_path / "best",
        checkpoint_dir=tmp_path / "ck",
        save_every=100,
    )
    assert res.early_stopped and not res.interrupted
    assert int(res.state.step) == 10  # evaluations at 2, 4 (best), 6, 8, 10: three without improvement
    assert res.best == {"step": 4, "value": 2.0}
    best = training.Checkpointer(tmp_path / "best", read_only=True)
    assert best.all_steps() == [4]
    _, snap = best.restore(None, training.snapshot(new_state(), jax.random.key(7), zero_carry()))
    assert int(snap["step"]) == 4
    # the run's own checkpoint is the state at the stop
    assert training.Checkpointer(tmp_path / "ck", read_only=True).all_steps() == [10]
    with pytest.raises(ValueError, match="patience must be a positive int"):
        quick_fit(2, eval_fn=scripted_eval([1.0]), patience=0)
    with pytest.raises(ValueError, match="give eval_fn"):
        quick_fit(2, patience=2)


def test_tensorboard_events_hold_every_record(tmp_path):
    from tensorboardX.proto import event_pb2  # tensorboardX is in the train extra

    res = quick_fit(6, log_every=2, eval_fn=lambda s: {"loss": 0.25}, eval_every=3, tensorboard_dir=tmp_path / "tb")
    seen = {}
    for f in (tmp_path / "tb").iterdir():
        data = f.read_bytes()
        pos = 0
        while pos < len(data):  # TFRecord: length (8 bytes), its CRC (4), the record, its CRC (4)
            n = int.from_bytes(data[pos : pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 16 + n
            for v in event.summary.value:
                seen[(v.tag, event.step)] = v.simple_value
    expected = {(k, r["step"]): v for r in res.history for k, v in r.items() if k not in ("step", "time_s")}
    assert set(seen) == set(expected)
    for key, v in expected.items():
        assert seen[key] == pytest.approx(v, rel=1e-6)
