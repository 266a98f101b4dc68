"""The Python examples of the README and of the guides (docs/guides/*.md) run as written, each block
on its own (imports included: a reader copies one block), in a fresh process with JAX's defaults."""

import pathlib
import re
import subprocess
import sys

import pytest

from tests.helpers.processes import fast_compile_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = [
    p for p in (ROOT / "README.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))) if "```python\n" in p.read_text()
]

RUNNER = r"""
import importlib.util, re, sys
blocks = re.findall(r"```python\n(.*?)```", open(sys.argv[1], encoding="utf-8").read(), flags=re.S)
have_torch = importlib.util.find_spec("torch") is not None
ran = 0
for k, code in enumerate(blocks):
    if "import torch" in code and not have_torch:
        continue
    exec(compile(code, f"{sys.argv[1]} block {k}", "exec"), {"__name__": "__main__"})  # a namespace of its own
    ran += 1
print(f"ran {ran} of {len(blocks)} blocks")
"""


def test_the_guides_hold_the_python_examples():
    total = sum(len(re.findall(r"```python\n", p.read_text())) for p in PAGES)
    assert total >= 12


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem if p.parent.name == "guides" else p.name)
def test_examples_run_each_on_its_own(page, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, str(page)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,  # whatever the examples write stays out of the repository
        env=fast_compile_env(),
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    ran = int(re.search(r"ran (\d+) of", out.stdout).group(1))
    assert ran >= len(blocks) - 1  # at most a PyTorch block skipped, where torch is absent
