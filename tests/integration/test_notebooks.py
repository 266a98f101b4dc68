"""Every tutorial notebook runs top to bottom (a shorter version: JAXLSTM_NOTEBOOK_QUICK=1).

Each notebook runs in its own process (nbclient there), so that the kernel client's
sockets and event loop never outlive it inside the test session.
"""

import os
import pathlib
import subprocess
import sys

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))

RUNNER = r"""
import sys, nbformat
from nbclient import NotebookClient
path = sys.argv[1]
nb = nbformat.read(path, as_version=4)
NotebookClient(nb, timeout=600, kernel_name="python3",
               resources={"metadata": {"path": sys.argv[2]}}).execute()
errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
print("cells:", len(nb.cells), "errors:", len(errors))
sys.exit(1 if errors else 0)
"""


def test_there_are_six_notebooks():
    assert len(NOTEBOOKS) == 6


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    env = dict(os.environ, JAXLSTM_NOTEBOOK_QUICK="1", MPLBACKEND="Agg")
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, str(path), str(path.parent)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    # nbclient raises CellExecutionError naming the failing cell and its traceback
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "errors: 0" in out.stdout
