"""The benchmark scripts run (tiny sizes; speed itself is never asserted in tests)."""

import json
import pathlib
import subprocess
import sys

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
        "--out",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "speed.json").read_text())
    assert {r["impl"] for r in data["rows"]} == {"jaxlstm seed", "jaxlstm classic", "flax OptimizedLSTMCell"}
    assert all(r["forward_s"] > 0 and r["train_s"] > 0 for r in data["rows"])
    assert (tmp_path / "speed.png").stat().st_size > 0
    assert "| 2, 6, 3, 4 | jaxlstm seed |" in (tmp_path / "speed.md").read_text()


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
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
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
    assert "classic train 2.00x (>= 1.8x: ok)" in text
    assert "classic forward 1.00x (>= 0.97x: ok)" in text
    assert "seed/classic forward 1.40 (<= 1.32: MISSED)" in text
    assert "seed/classic train 1.33 (<= 1.32: MISSED)" in text
    rows[1] = _row(size, "jaxlstm classic", 10.5, 60.0, base)  # train 1.5x < 1.8x, forward 0.95x
    text = speed.floor_checks({"rows": rows})
    assert "classic train 1.50x (>= 1.8x: MISSED)" in text and "classic forward 0.95x (>= 0.97x: MISSED)" in text


def test_cpu_effects_script_writes_its_table(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cpu_effects.py"), "--rounds", "2", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    text = (tmp_path / "cpu_effects.md").read_text()
    assert "us/step" in text and "fresh buffer vs in place" in text


def test_device_script_runs_on_the_cpu_and_names_what_it_skips(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "device.py"), "--smoke", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT / "benchmarks")
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "device.json").read_text())
    measured = {(r["impl"], r["dtype"]) for r in data["rows"] if "skipped" not in r}
    for dtype in ("float32", "bfloat16"):
        for impl in ("jaxlstm scan (output-map cell)", "jaxlstm scan (classic)", "flax OptimizedLSTMCell"):
            assert (impl, dtype) in measured
    skipped = {r["impl"]: r["skipped"] for r in data["rows"] if "skipped" in r}
    if data["device"].endswith("(cpu)"):
        assert (
            "CUDA GPU" in skipped["jaxlstm cudnn (classic)"] and "CUDA GPU" in skipped["cuDNN (jax.experimental.rnn)"]
        )
    assert "| 2, 6, 4, 4 | bfloat16 | jaxlstm scan (classic) |" in (tmp_path / "device.md").read_text()
