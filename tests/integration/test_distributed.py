"""Several processes on localhost (JAX's distributed runtime, gloo collectives) against one process.

Each test starts real ``jaxlstm train`` processes (or a script calling ``fit``) that
join through a coordinator on a free local port, with short start-up and
heartbeat timeouts. They need both cores at once, so they are marked
``serial`` and run after the parallel part of the suite (see ``.ci/run``).

What must hold:

* two processes (one CPU device each) train the same model as one process
  with two CPU devices, bit for bit, and as one process with one device to
  float32 reduction order (the held-out figure within 2e-3 bits/char);
* only process 0 writes the run's files;
* SIGTERM to either process stops both after the same step, saved once, and
  the run resumes in two processes and in one, to the same result;
* a killed process ends the other within a bounded time, with one line;
* start-up failures (no coordinator, a missing partner, a bad process id)
  are one line and leave nothing behind.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import socket
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.helpers.processes import Process, default_compile_env

pytestmark = [pytest.mark.slow, pytest.mark.serial]

LAUNCHER = "import sys, jaxlstm_cli; sys.exit(jaxlstm_cli.main())"
ARGS = [
    "--steps",
    "60",
    "--seq-len",
    "32",
    "--batch-size",
    "8",
    "--hidden-size",
    "32",
    "--embed-dim",
    "8",
    "--eval-every",
    "20",
    "--save-every",
    "10",
    "--log-every",
    "5",
    "--no-progress",
]
ENV: dict = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    ENV.update(default_compile_env(PYTHONUNBUFFERED="1"))
    ENV.pop("JAX_COMPILATION_CACHE_DIR", None)  # two processes of one run compile side by side
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler", "in", "mind"]
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(" ".join(rng.choice(words, 20000)) + "\n", encoding="utf-8")
    return path


def train(text, out, *extra) -> list[str]:
    return [sys.executable, "-c", LAUNCHER, "train", "--text", str(text), "--out", str(out), *ARGS, *extra]


def pair(text, out, *extra, init_timeout: int = 60) -> list[Process]:
    """Two processes of one run (process 1 first: it waits for the coordinator)."""
    port = free_port()
    common = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--init-timeout", str(init_timeout)]
    common += ["--heartbeat-timeout", "10"]
    return [Process(train(text, out, *extra, *common, "--process-id", str(i)), env=ENV) for i in (1, 0)]


def finish(procs: list[Process], timeout: float = 300) -> list[int]:
    return [p.finish(timeout=timeout) for p in procs]


def metrics(out: pathlib.Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def steps(out: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def assert_close_runs(a: list[dict], b: list[dict], rtol: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_allclose(x[k], y[k], rtol=rtol, err_msg=f"step {x['step']}: {k}")


def one_line_error(p: Process) -> str:
    lines = [ln for ln in p.lines if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1, p.output
    assert "Traceback" not in p.output and "Check failure" not in p.output and " @ 0x" not in p.output, p.output
    return errors[0]


@pytest.fixture(scope="module")
def two_devices(text, tmp_path_factory):
    """One process, two CPU devices: the reference the two processes must equal bit for bit."""
    out = tmp_path_factory.mktemp("two-devices") / "run"
    p = Process(train(text, out, "--cpu-devices", "2"), env=ENV)
    assert p.finish() == 0, p.output
    assert "split over 2 CPU devices" in p.output
    return out


def test_two_processes_train_as_one_process(text, two_devices, tmp_path):
    out = tmp_path / "run"
    procs = pair(text, out)
    assert finish(procs) == [0, 0], [p.output for p in procs]
    worker, writer = procs
    assert "split over 2 processes" in writer.output
    assert worker.output.strip() == "", worker.output  # process 0 speaks for the run
    # bit for bit against one process with as many devices: the same program, split the same way
    assert metrics(out) == metrics(two_devices)
    assert steps(out) == steps(two_devices)
    leftovers = [p.name for p in out.rglob("*") if ".tmp" in p.name]
    assert leftovers == []
    # and one device: reductions in another order (float32); the floor on the held-out figure
    single = tmp_path / "single"
    p = Process(train(text, single, "--cpu-devices", "1"), env=ENV)
    assert p.finish() == 0, p.output
    assert "split over" not in p.output
    assert_close_runs(metrics(out), metrics(single), rtol=1e-4)
    held = lambda rows: [r["eval_bits_per_char"] for r in rows if "eval_bits_per_char" in r][-1]
    assert abs(held(metrics(out)) - held(metrics(single))) < 2e-3


@pytest.mark.parametrize("target", [1, 0], ids=["sigterm-to-process-1", "sigterm-to-process-0"])
def test_a_signal_to_one_process_stops_both_then_the_run_resumes_in_two_and_in_one(text, two_devices, tmp_path, target):
    out = tmp_path / "run"
    procs = pair(text, out)
    worker, writer = procs
    assert writer.wait_for("step 20: held-out"), writer.output
    procs[1 - target].p.send_signal(signal.SIGTERM)  # procs = [process 1, process 0]
    assert finish(procs) == [143, 143], [p.output for p in procs]
    assert "Traceback" not in writer.output + worker.output
    stopped = steps(out)[-1]
    assert f"stopped at step {stopped}" in writer.output, writer.output
    assert 20 <= stopped < 60
    # resume in two processes and, from a copy, in one process with one device
    again = tmp_path / "one"
    shutil.copytree(out, again)
    procs = pair(text, out, "--resume")
    assert finish(procs) == [0, 0], [p.output for p in procs]
    assert metrics(out) == metrics(two_devices)  # two devices again: bit for bit
    p = Process(train(text, again, "--resume", "--cpu-devices", "1"), env=ENV)
    assert p.finish() == 0, p.output
    assert_close_runs(metrics(again), metrics(two_devices), rtol=1e-4)


@pytest.mark.parametrize("victim", [1, 0], ids=["kill-process-1", "kill-process-0"])
def test_a_killed_process_ends_the_other_with_one_line(text, tmp_path, victim):
    out = tmp_path / "run"
    procs = pair(text, out, "--steps", "400")
    writer = procs[1]
    assert writer.wait_for("step 20: held-out"), writer.output
    time.sleep(0.3)
    killed, other = procs[1 - victim], procs[victim]
    killed.p.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    assert killed.finish() == -signal.SIGKILL
    rc = other.finish(timeout=60)  # bounded: the next collective fails at once, the heartbeat at the latest
    assert time.monotonic() - t0 < 30
    assert rc == 1, other.output
    line = one_line_error(other)
    assert "lost another process" in line or "distributed runtime ended this process" in line, line
    # every checkpoint written stays intact: the run resumes from the newest, in one process
    saved = steps(out)
    assert saved and saved[-1] >= 20
    p = Process(train(text, out, "--resume", "--steps", str(saved[-1] + 5), "--cpu-devices", "1"), env=ENV)
    assert p.finish() == 0, p.output
    assert "damaged" not in p.output


def test_start_up_failures_are_one_line_and_leave_nothing(text, tmp_path):
    port = free_port()
    cases = [
        # (extra arguments, expected exit code, words of the message)
        (["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", "1"], 2, "no coordinator"),
        (["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", "0"], 1, "did not answer"),
        (["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", "2"], 2, "--process-id"),
        (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], 2, "HOST:PORT"),
    ]
    for k, (extra, code, words) in enumerate(cases):
        out = tmp_path / f"run{k}"
        p = Process(train(text, out, *extra, "--init-timeout", "3"), env=ENV)
        t0 = time.monotonic()
        assert p.finish(timeout=120) == code, (extra, p.output)
        assert time.monotonic() - t0 < 60
        assert words in one_line_error(p), p.output
        assert not out.exists() or not [n for n in out.iterdir() if n.name != ".jaxlstm.lock"]


def test_two_processes_with_one_process_id_are_one_line_each(text, tmp_path):
    out = tmp_path / "run"
    port = free_port()
    common = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--init-timeout", "8"]
    procs = [Process(train(text, out, *common, "--process-id", str(i)), env=ENV) for i in (1, 1, 0)]
    codes = finish(procs, timeout=120)
    assert codes == [1, 1, 1], [p.output for p in procs]
    lines = [one_line_error(p) for p in procs]
    assert any("same --process-id" in line for line in lines), lines


LIBRARY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    process, port = int(sys.argv[1]), sys.argv[2]
    if process >= 0:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{port}", 2, process, initialization_timeout=60,
                                   heartbeat_timeout_seconds=10)
    else:
        jax.config.update("jax_num_cpu_devices", 2)
    import jax.numpy as jnp, numpy as np, optax
    from jaxlstm.linen import LSTM
    from jaxlstm import training
    import flax.linen as nn

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(LSTM(8)(x))[..., 0]

    model = Model()
    data = np.random.default_rng(0).normal(size=(16, 4, 6, 3)).astype(np.float32)  # 16 batches of 4
    params = model.init(jax.random.key(0), data[0])["params"]
    state = training.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2))

    def loss(p, state, batch, rng, carry):
        l = jnp.mean((state.apply_fn({"params": p}, batch) - jnp.sum(batch, -1)) ** 2)
        return l, ({}, None)

    local = process >= 0 and sys.argv[3] == "local"
    rows = slice(2 * process, 2 * process + 2) if local else slice(None)
    res = training.fit(state, training.make_train_step(loss, donate=False), lambda s: data[s % 16][rows],
                       num_steps=12, rng=jax.random.key(1), progress=False, log_every=1,
                       mesh=training.data_mesh(), process_local_batches=local)
    flat = [float(np.asarray(a).ravel()[0]) for a in jax.tree.leaves(res.state.params)]
    print(json.dumps({"loss": [h["loss"] for h in res.history], "params": flat}))
    """
)


@pytest.mark.parametrize("feed", ["global", "local"])
def test_fit_in_two_processes_equals_two_devices(tmp_path, feed):
    """The library path: ``fit(mesh=data_mesh())`` in two processes, each computing the global batch or
    reading only its own rows (``process_local_batches``), against one process with two devices."""
    script = tmp_path / "fit.py"
    script.write_text(LIBRARY_SCRIPT)
    port = str(free_port())
    procs = [Process([sys.executable, str(script), str(i), port, feed], env=ENV) for i in (1, 0)]
    assert finish(procs) == [0, 0], [p.output for p in procs]
    ref = Process([sys.executable, str(script), "-1", port, feed], env=ENV)
    assert ref.finish() == 0, ref.output
    last = lambda p: json.loads([ln for ln in p.lines if ln.startswith("{")][-1])
    for p in procs:
        assert last(p) == last(ref)
    assert last(ref)["loss"][-1] < last(ref)["loss"][0]


def test_scaling_benchmark_runs_every_setting(tmp_path):
    """benchmarks/scaling.py --quick: every setting measured (two processes included) and the table written."""
    root = pathlib.Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "benchmarks" / "scaling.py"), "--quick", "--no-torch", "--out", str(tmp_path)]
    p = Process(cmd, env=default_compile_env())
    assert p.finish(timeout=600) == 0, p.output
    data = json.loads((tmp_path / "scaling.json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert names == [
        "jaxlstm, 1 CPU device",
        "jaxlstm, 2 CPU devices in 1 process",
        "jaxlstm, 2 CPU devices in 1 process, --allocator system",
        "jaxlstm, 2 processes x 1 CPU device",
    ]
    assert all(len(r["per_step_s"]) == 2 and min(r["per_step_s"]) > 0 for r in data["rows"])
    assert [row["hidden_size"] for row in data["projection"]] == [384, 1024, 2048]
    for row in data["projection"]:  # an independent count of the bytes: 4 per parameter
        assert row["allreduce_bytes"] == 4 * row["params"]
        assert 0 < row["efficiency_512"] <= row["efficiency_64"] <= row["efficiency_8"] < 1
    assert "| jaxlstm, 2 processes x 1 CPU device |" in (tmp_path / "scaling.md").read_text()
    # the parameter count on paper against the main job's model itself
    import jax

    from jaxlstm.app import charlm

    cfg = charlm.Config()
    cfg.vocab = "".join(sorted(set(charlm.load_text(None))))
    _, state = charlm._state(cfg)
    assert data["projection"][0]["params"] == sum(a.size for a in jax.tree.leaves(state.params))
