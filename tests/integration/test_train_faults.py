"""Fault injection against a real ``jaxlstm train`` process.

Signals (SIGINT, SIGTERM, a double SIGINT) and SIGKILL land at many moments:
during start-up, during compilation, between steps, while a checkpoint is
written and while the held-out text is evaluated. Each interrupted run is then
resumed to the end, and its parameters, optimizer state and metrics file must
equal an uninterrupted run's bit for bit. No interruption may print a
traceback or lose a checkpoint that was saved.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import sys
import time

import jax
import numpy as np
import pytest

from tests.helpers.processes import Process, default_compile_env

pytestmark = pytest.mark.slow

STEPS = 60
# H = 128, the size at which Ctrl-C used to land while the state was donated to the step; a save
# every 10 steps keeps a checkpoint write in flight much of the time, so signals land in saves too;
# --streams: the checkpoints then hold the carried state as well, which a resume must restore
ARGS = [
    "--streams",
    "--steps",
    str(STEPS),
    "--seq-len",
    "64",
    "--batch-size",
    "16",
    "--hidden-size",
    "128",
    "--embed-dim",
    "16",
    "--eval-every",
    "20",
    "--save-every",
    "10",
    "--no-progress",
]


def _command(out, *extra):
    launcher = "import sys, jaxlstm_cli; sys.exit(jaxlstm_cli.main())"
    return [sys.executable, "-c", launcher, "train", "--text", str(TEXT), "--out", str(out), *ARGS, *extra]


TEXT = pathlib.Path()
ENV: dict = {}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    global TEXT
    # one compilation cache for all the processes here: each start-up compiles in a fraction of the time
    # XLA's default optimisation (the test session compiles at a cheaper level, see tests/conftest.py):
    # these runs are bound by run time, and compile from the shared cache after the first
    ENV.update(
        default_compile_env(),
        PYTHONUNBUFFERED="1",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax-cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler", "in", "mind"]
    TEXT = tmp_path_factory.mktemp("corpus") / "text.txt"
    TEXT.write_text(" ".join(rng.choice(words, 20000)) + "\n", encoding="utf-8")
    return TEXT


def Proc(cmd):
    """A ``jaxlstm train`` subprocess in this module's environment (see :class:`Process`)."""
    return Process(cmd, env=ENV)


def _final_state(out: pathlib.Path):
    from jaxlstm import training
    from jaxlstm.app import charlm

    with jax.enable_x64(False):  # as the command ran
        cfg = charlm.read_config(out)
        model, state = charlm._state(cfg)
        ckpt = training.Checkpointer(out / "checkpoints", read_only=True)
        try:  # the carried state too: a resumed run must continue each stream from where it stopped
            template = training.snapshot(state, jax.random.key(0), charlm._initial_carry(cfg, model, state))
            step, snap = ckpt.restore(None, template)
        finally:
            ckpt.close()
    return step, snap


def _metrics(out: pathlib.Path):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    p = Proc(_command(out))
    assert p.finish() == 0, p.output
    step, snap = _final_state(out)
    assert step == STEPS
    return snap, _metrics(out)


def _assert_same_run(out, reference):
    snap, metrics = reference
    step, got = _final_state(out)
    assert step == STEPS
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(snap), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _metrics(out) == metrics


def _no_traceback(p: Proc):
    assert "Traceback" not in p.output, p.output


# (name, what to wait for before the fault, extra delay in seconds, signals to send)
FAULTS = [
    ("sigint-at-import", None, 0.4, [signal.SIGINT]),
    ("sigint-between-steps", "step 20: held-out", 0.35, [signal.SIGINT]),
    ("sigterm-between-steps", "step 20: held-out", 0.8, [signal.SIGTERM]),
    ("sigint-at-eval", "step 40: held-out", 0.0, [signal.SIGINT]),
    ("double-sigint", "step 20: held-out", 0.5, [signal.SIGINT, signal.SIGINT]),
    ("sigkill-at-eval", "step 40: held-out", 0.15, [signal.SIGKILL]),
]


@pytest.mark.parametrize("name,wait_for,delay,signals", FAULTS, ids=[f[0] for f in FAULTS])
def test_interrupted_run_resumes_bit_for_bit(reference, tmp_path, name, wait_for, delay, signals):
    out = tmp_path / "run"
    p = Proc(_command(out))
    if wait_for is not None:
        assert p.wait_for(wait_for), p.output
    time.sleep(delay)
    for k, sig in enumerate(signals):
        if p.p.poll() is None:
            p.p.send_signal(sig)
        if k + 1 < len(signals):
            time.sleep(0.05)
    rc = p.finish()
    if signals[0] == signal.SIGKILL:
        assert rc == -signal.SIGKILL
    else:
        _no_traceback(p)
        # stopped by the signal (128 + its number), or it had already finished
        assert rc in (0, 128 + signals[0]), (rc, p.output)
        if rc != 0 and len(signals) == 1 and "held-out" in p.output:
            assert "saved" in p.output, p.output
    started = out.joinpath("checkpoints").is_dir() and any(
        d.name.isdigit() for d in out.joinpath("checkpoints").iterdir()
    )
    if not started:  # stopped before the first checkpoint: nothing is left behind
        assert not out.exists() or not any(n.name != ".jaxlstm.lock" for n in out.iterdir()), list(out.iterdir())
        q = Proc(_command(out))
    else:
        q = Proc(_command(out, "--resume"))
    assert q.finish() == 0, q.output
    _no_traceback(q)
    _assert_same_run(out, reference)


def test_a_second_process_is_refused_while_one_trains(corpus, tmp_path):
    out = tmp_path / "run"
    p = Proc(_command(out))
    assert p.wait_for("model:"), p.output
    q = Proc(_command(out, "--resume"))
    assert q.finish() == 2
    assert "another jaxlstm process" in q.output and "Traceback" not in q.output
    p.p.send_signal(signal.SIGINT)
    assert p.finish() in (0, 130)
    _no_traceback(p)


def test_damaged_latest_checkpoint_falls_back(reference, tmp_path):
    """Corrupt the newest checkpoint's data after a kill: resume falls back to the one before, and says so."""
    out = tmp_path / "run"
    p = Proc(_command(out))
    assert p.wait_for("step 40: held-out"), p.output
    p.p.send_signal(signal.SIGKILL)
    p.finish()
    steps = sorted(int(d.name) for d in (out / "checkpoints").iterdir() if d.name.isdigit())
    latest = out / "checkpoints" / str(steps[-1]) / "state"
    for f in sorted(x for x in latest.rglob("*") if x.is_file() and x.stat().st_size > 64):
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    g = Proc(
        [
            sys.executable,
            "-c",
            "import sys, jaxlstm_cli; sys.exit(jaxlstm_cli.main())",
            "generate",
            "--checkpoint",
            str(out),
            "--length",
            "20",
        ]
    )
    assert g.finish() == 0, g.output
    assert f"checkpoint {steps[-1]} is damaged" in g.output and "Traceback" not in g.output
    q = Proc(_command(out, "--resume"))
    assert q.finish() == 0, q.output
    assert f"checkpoint {steps[-1]} is damaged" in q.output
    _no_traceback(q)
    _assert_same_run(out, reference)
    shutil.rmtree(out)
