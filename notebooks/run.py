"""Run the tutorial notebooks top to bottom and store their outputs in place.

    python notebooks/run.py              # every notebook, full size, outputs written back
    python notebooks/run.py 05_char_lm   # one notebook
    python notebooks/run.py --quick --check   # what the test suite runs: shorter, nothing written

Each notebook runs in a fresh kernel (nbclient) with the notebook's folder as
its working directory; a cell that raises stops the run with exit code 1.
Stored outputs are what make the plots visible when browsing the repository,
so rerun this after changing a notebook or what it shows.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent


_TMP = re.compile(re.escape(tempfile.gettempdir()) + r"/[^/\s'\"]+")


def _clean(text: str) -> str:
    """Text with this machine's paths replaced: temporary folders by ``<tmp>``, the repository by ``.``."""
    return _TMP.sub("<tmp>", text.replace(str(HERE.parent), "."))


def _without_local_paths(output) -> None:
    if "text" in output:
        output["text"] = _clean(output["text"])
    for key, value in output.get("data", {}).items():
        if key.startswith("text/") and isinstance(value, str):
            output["data"][key] = _clean(value)


def run(path: pathlib.Path, *, quick: bool, write: bool) -> int:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend stores the figures as images
    if quick:
        os.environ["JAXLSTM_NOTEBOOK_QUICK"] = "1"
    else:
        os.environ.pop("JAXLSTM_NOTEBOOK_QUICK", None)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except CellExecutionError as e:
        print(f"{path.name}: a cell failed:\n{e}", file=sys.stderr)
        return 1
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    print(f"{path.name}: {len(nb.cells)} cells, {len(errors)} errors")
    if write and not errors:
        for cell in nb.cells:  # the kernel's timing metadata would change on every run
            cell.get("metadata", {}).pop("execution", None)
            for output in cell.get("outputs", []):
                _without_local_paths(output)
        nbformat.write(nb, path)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the notebooks and store their outputs.")
    parser.add_argument("names", nargs="*", help="notebook names or paths (default: all)")
    parser.add_argument("--quick", action="store_true", help="the shorter version the tests run")
    parser.add_argument("--check", action="store_true", help="run only; do not write the outputs back")
    args = parser.parse_args(argv)
    paths = [HERE / (n if n.endswith(".ipynb") else n + ".ipynb") for n in args.names] or sorted(HERE.glob("*.ipynb"))
    status = 0
    for path in paths:
        status |= run(path.resolve(), quick=args.quick, write=not args.check)
    return status


if __name__ == "__main__":
    sys.exit(main())
