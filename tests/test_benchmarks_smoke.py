"""The benchmark scripts run (tiny sizes; speed itself is never asserted in tests)."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_speed_script_writes_table_json_and_chart(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--sizes", "2,6,3,4", "--rounds", "2",
           "--impls", "jaxlstm seed,jaxlstm classic,flax OptimizedLSTMCell", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "speed.json").read_text())
    assert {r["impl"] for r in data["rows"]} == {"jaxlstm seed", "jaxlstm classic", "flax OptimizedLSTMCell"}
    assert all(r["forward_s"] > 0 and r["train_s"] > 0 for r in data["rows"])
    assert (tmp_path / "speed.png").stat().st_size > 0
    assert "| 2, 6, 3, 4 | jaxlstm seed |" in (tmp_path / "speed.md").read_text()


def test_adding_problem_script_runs(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "adding_problem.py"), "--T", "10", "--steps", "30",
           "--eval-every", "10", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "adding_T10.json").read_text())
    assert len(data["curve"]) == 3 and data["baseline_mse"] > 0.16
