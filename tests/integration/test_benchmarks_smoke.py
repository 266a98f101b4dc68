"""The benchmark scripts run (tiny sizes; speed itself is never asserted in tests)."""

import json
import pathlib
import subprocess
import sys

import pytest

from tests.helpers.processes import fast_compile_env

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_speed_script_writes_table_json_and_chart(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "speed.py"),
        "--sizes",
        "2,6,3,4",
        "--rounds",
        "2",
        "--impls",
        "jaxlstm seed,jaxlstm classic,flax OptimizedLSTMCell",
        "--gap",
        "0",
        "--cores",
        "1",
        "--cpu-devices",
        "2",
        "--out",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=fast_compile_env())
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "speed.json").read_text())
    assert data["cores"] == 1 and data["cores_allowed"] == 1  # the run was pinned to one core
    assert data["cpu_devices"] == 2
    split = "jaxlstm classic, batch over 2 CPU devices (setting)"  # the row --cpu-devices adds
    assert {r["impl"] for r in data["rows"]} == {"jaxlstm seed", "jaxlstm classic", "flax OptimizedLSTMCell", split}
    assert all(r["forward_s"] > 0 and r["train_s"] > 0 for r in data["rows"])
    assert (tmp_path / "speed.png").stat().st_size > 0
    assert "| 2, 6, 3, 4 | jaxlstm seed |" in (tmp_path / "speed.md").read_text()


def test_layout_script_measures_every_variant_and_names_the_choice(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "layout.py"), "--quick", "--rounds", "1", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=fast_compile_env())
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "layout.json").read_text())
    assert len(data["rows"]) == 4  # two sizes x two cells
    for row in data["rows"]:
        assert set(row["ms"]) == {"row", "feature, [a; x]", "feature, two"} and min(row["ms"].values()) > 0
        assert row["chosen"] == ("feature, [a; x]" if row["size"][3] >= 256 else "row")  # B = 16: one matmul
    assert "**" in (tmp_path / "layout.md").read_text()


@pytest.mark.parametrize(
    "script,args",
    [
        ("speed.py", ["--gap", "-1"]),
        ("speed.py", ["--rounds", "-2"]),
        ("speed.py", ["--cores", "0"]),
        ("speed.py", ["--cores", "100000"]),
        ("speed.py", ["--cpu-devices", "1"]),
        ("layout.py", ["--rounds", "-2"]),
    ],
)
def test_benchmark_scripts_refuse_bad_settings_in_one_line(tmp_path, script, args):
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args, "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=fast_compile_env())
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stderr.strip().splitlines()[-1].startswith(f"{script}: error: --")
    assert not any(tmp_path.iterdir())  # nothing measured, nothing written


def test_adding_problem_script_runs(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "adding_problem.py"),
        "--T",
        "10",
        "--steps",
        "30",
        "--eval-every",
        "10",
        "--out",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=fast_compile_env())
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "adding_T10.json").read_text())
    assert len(data["curve"]) == 3 and data["baseline_mse"] > 0.16


def _row(size, impl, fwd_s, train_s, base):
    return dict(
        size=list(size),
        impl=impl,
        forward_s=fwd_s,
        train_s=train_s,
        forward_speedup=base[0] / fwd_s,
        train_speedup=base[1] / train_s,
    )


def test_floor_checks_flag_a_missed_floor():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import speed
    finally:
        sys.path.pop(0)
    size = (8, 512, 64, 128)  # floor 1.8x for training; seed may cost 1 + 128/768 + 0.15 = 1.317x
    base = (10.0, 90.0)
    rows = [
        _row(size, "flax OptimizedLSTMCell", *base, base),
        _row(size, "jaxlstm classic", 10.0, 45.0, base),  # train 2.0x, forward 1.0x
        _row(size, "jaxlstm seed", 14.0, 60.0, base),
    ]  # forward 1.40 (over), train 1.33 (over)
    text = speed.floor_checks({"rows": rows})
    assert "vs PyTorch" not in text  # PyTorch did not run
    assert "classic train 2.00x (>= 1.8x: ok)" in text
    assert "classic forward 1.00x (>= 0.97x: ok)" in text
    assert "seed/classic forward 1.40 (<= 1.32: MISSED)" in text
    assert "seed/classic train 1.33 (<= 1.32: MISSED)" in text
    rows[1] = _row(size, "jaxlstm classic", 10.5, 60.0, base)  # train 1.5x < 1.8x, forward 0.95x
    text = speed.floor_checks({"rows": rows})
    assert "classic train 1.50x (>= 1.8x: MISSED)" in text and "classic forward 0.95x (>= 0.97x: MISSED)" in text
    assert "seed/classic forward 1.33 (<= 1.15: MISSED)" in text  # 14.0 / 10.5
    rows.append(_row(size, "torch nn.LSTM", 9.0, 60.0, base))  # train 60 / 60 = 1.00x, forward 9 / 10.5 = 0.86x
    text = speed.floor_checks({"rows": rows})
    assert "classic train vs PyTorch 1.00x (>= 1.0x: ok)" in text
    assert "classic forward vs PyTorch 0.86x (>= 0.9x: MISSED)" in text


def test_cpu_effects_script_writes_its_table(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cpu_effects.py"), "--rounds", "2", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=fast_compile_env())
    assert out.returncode == 0, out.stderr[-2000:]
    text = (tmp_path / "cpu_effects.md").read_text()
    assert "us/step" in text and "fresh buffer vs in place" in text and "two independent scans" in text


def test_device_script_runs_on_the_cpu_and_names_what_it_skips(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "device.py"), "--smoke", "--out", str(tmp_path)]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=ROOT / "benchmarks", env=fast_compile_env()
    )
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "device.json").read_text())
    measured = {(r["impl"], r["dtype"]) for r in data["rows"] if "skipped" not in r}
    for dtype in ("float32", "bfloat16"):
        for impl in (
            "jaxlstm scan (output-map cell)",
            "jaxlstm scan (classic)",
            "jaxlstm pallas (output-map cell)",
            "jaxlstm pallas (classic)",
            "flax OptimizedLSTMCell",
        ):
            assert (impl, dtype) in measured
    skipped = {r["impl"]: r["skipped"] for r in data["rows"] if "skipped" in r}
    if data["device"].endswith("(cpu)"):
        assert (
            "CUDA GPU" in skipped["jaxlstm cudnn (classic)"] and "CUDA GPU" in skipped["cuDNN (jax.experimental.rnn)"]
        )
    assert "| 2, 6, 4, 4 | bfloat16 | jaxlstm scan (classic) |" in (tmp_path / "device.md").read_text()


def test_xla_flags_script_writes_its_table(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "xla_flags.py"), "--quick", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=fast_compile_env())
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "xla_flags.json").read_text())
    row = data["ms"]["main job training step, output-map cell"]
    assert set(row) == {"XLA defaults", "--xla_cpu_use_xnnpack=true"}
    assert all(len(v) == 1 and v[0] > 0 for v in row.values())
    text = (tmp_path / "xla_flags.md").read_text()
    assert "| main job training step, output-map cell |" in text and "(1.00)" in text


def _import_benchmark(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_quality_tasks_pose_the_problems_they_name():
    import jax
    import numpy as np

    quality = _import_benchmark("quality")
    for make, T in ((quality.adding_data, 50), (quality.xor_data, 40)):
        xs, ys = (np.asarray(a) for a in make(jax.random.key(0), 256, T))
        marks = xs[..., 1]
        assert set(np.unique(marks)) == {0.0, 1.0} and (marks.sum(1) == 2).all()
        first, second = (np.argwhere(marks)[:, 1].reshape(-1, 2)).T
        assert (first < T // 2).all() and (second >= T // 2).all()
        marked = xs[..., 0][marks == 1].reshape(-1, 2)
        if make is quality.adding_data:
            np.testing.assert_allclose(ys, marked.sum(1), rtol=1e-6)
            assert 0.9 < ys.mean() < 1.1  # the mean-predicting baseline's target
        else:
            bits = (marked > 0).astype(int)  # inputs are +-1
            np.testing.assert_array_equal(ys, bits[:, 0] ^ bits[:, 1])
            assert 0.35 < ys.mean() < 0.65


def test_quality_summary_counts_steps_to_target_per_seed():
    quality = _import_benchmark("quality")
    task = quality.Task(
        name="t", title="t", init=None, batch=None, loss=None, evaluate=None, metric="test MSE",
        lower_is_better=True, target=0.01, baseline=0.167, steps=30, eval_every=10, lr=1e-3,
    )  # fmt: skip
    run = {"curve": [(10, [0.1, 0.005, 0.2]), (20, [0.008, 0.004, 0.3]), (30, [0.02, 0.003, 0.2])]}
    s = quality.summarise(task, run)
    assert s["step"] == 30 and s["steps_to_target"] == [20, 10, None]
    assert abs(s["mean"] - (0.02 + 0.003 + 0.2) / 3) < 1e-12
    assert quality._reached_text(s["steps_to_target"]) == "15 (2 of 3 seeds)"
    assert quality.summarise(task, run, at_step=20)["per_seed"] == [0.008, 0.004, 0.3]


def test_quality_script_writes_its_table_json_and_chart(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--seeds", "2", "--out", str(tmp_path)]
    cmd += ["--only", "charlm", "vowels"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=fast_compile_env())
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "quality.json").read_text())
    assert set(data["tasks"]) == {"charlm", "vowels"}
    labels = [label for label, _ in data["tasks"]["charlm"]["rows"]]
    assert labels == ["output map", "classic (equal steps)", "classic (equal time)"]
    for task in data["tasks"].values():
        assert set(task["cost_s"]) == {"output map", "classic"} and min(task["cost_s"].values()) > 0
        for _, row in task["rows"]:
            assert len(row["per_seed"]) == 2
    assert 0.0 <= data["tasks"]["vowels"]["rows"][0][1]["mean"] <= 1.0
    text = (tmp_path / "quality.md").read_text()
    assert "| Japanese Vowels (9 speakers) | classic |" in text
    assert (tmp_path / "quality.png").stat().st_size > 0


def test_quality_script_refuses_an_unknown_task(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--only", "nope", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=fast_compile_env())
    assert out.returncode != 0 and "unknown task(s) nope" in out.stderr and "Traceback" not in out.stderr


def test_torch_charlm_schedule_is_optax_s():
    import optax

    charlm_torch = _import_benchmark("charlm_torch")
    ours = charlm_torch.schedule(4e-3, 300, 15)
    reference = optax.warmup_cosine_decay_schedule(0.0, 4e-3, warmup_steps=15, decay_steps=300, end_value=4e-4)
    for step in range(0, 320, 7):
        assert abs(ours(step) - float(reference(step))) < 1e-9, step


def test_torch_charlm_script_runs(tmp_path):
    pytest.importorskip("torch")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "charlm_torch.py"), "--quick", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=fast_compile_env())
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "charlm_torch.json").read_text())
    assert data["steps_done"] == 6 and [c[0] for c in data["curve"]] == [3, 6]
    assert 0 < data["held_out_bits_per_char"] < 8


@pytest.mark.parametrize("classic", [False, True], ids=["output_map", "classic"])
def test_serving_script_measures_every_path(tmp_path, classic):
    """benchmarks/serving.py --quick: each installed path stepped at B = 1 and 2, the table written; with
    --classic, ONNX's own LSTM operator too."""
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "serving.py"),
        "--quick",
        "--batches",
        "1,2",
        "--out",
        str(tmp_path),
        *(["--classic"] if classic else []),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=fast_compile_env())
    assert out.returncode == 0, out.stderr[-2000:]
    name = "serving_quick" + ("_classic" if classic else "")
    data = json.loads((tmp_path / f"{name}.json").read_text())
    expected = {"jaxlstm Stepper", "jax.export artifact"}
    for optional, module in (("onnxruntime", "jax2onnx"), ("PyTorch nn.LSTM", "torch")):
        if subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0:
            expected.add(optional)
    if classic and "onnxruntime" in expected:
        expected.add("onnxruntime, LSTM operator")
    assert set(data["batches"]) == {"1", "2"}
    for rows in data["batches"].values():
        assert set(rows) == expected
        assert all(r["n"] == 10 and 0 < r["median_us"] <= r["p99_us"] for r in rows.values())
    assert "| jaxlstm Stepper |" in (tmp_path / f"{name}.md").read_text()
