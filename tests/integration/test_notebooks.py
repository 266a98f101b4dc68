"""Every tutorial notebook runs top to bottom (a shorter version: JAXLSTM_NOTEBOOK_QUICK=1) and is stored
with its outputs (``python notebooks/run.py`` regenerates them).

Each notebook runs in its own process (notebooks/run.py, nbclient there), so that the kernel client's
sockets and event loop never outlive it inside the test session.
"""

import pathlib
import subprocess
import sys

import nbformat
import pytest

from tests.helpers.processes import fast_compile_env

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))

RUNNER = pathlib.Path(__file__).resolve().parents[2] / "notebooks" / "run.py"


def test_there_are_six_notebooks():
    assert len(NOTEBOOKS) == 6


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    out = subprocess.run(
        [sys.executable, str(RUNNER), "--quick", "--check", str(path)],
        capture_output=True,
        text=True,
        env=fast_compile_env(),
        timeout=900,
    )
    # nbclient raises CellExecutionError naming the failing cell and its traceback
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert f"{path.name}: {len(nbformat.read(path, as_version=4).cells)} cells, 0 errors" in out.stdout


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_with_its_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert code and all(c.get("execution_count") for c in code), "run: python notebooks/run.py " + path.stem
    assert not [o for c in code for o in c.get("outputs", []) if o.output_type == "error"]
