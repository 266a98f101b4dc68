"""The README's Python examples run as written, in order, in one namespace, in a fresh process with
JAX's defaults (as a user's session)."""

import pathlib
import re
import subprocess
import sys

from tests.helpers.processes import fast_compile_env

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"

RUNNER = r"""
import importlib.util, re, sys
blocks = re.findall(r"```python\n(.*?)```", open(sys.argv[1], encoding="utf-8").read(), flags=re.S)
have_torch = importlib.util.find_spec("torch") is not None
namespace, ran = {}, 0
for k, code in enumerate(blocks):
    if "import torch" in code and not have_torch:
        continue
    exec(compile(code, f"README block {k}", "exec"), namespace)
    ran += 1
print(f"ran {ran} of {len(blocks)} README blocks")
"""


def test_readme_examples_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, str(README)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,  # whatever the examples write stays out of the repository
        env=fast_compile_env(),
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    ran = int(re.search(r"ran (\d+) of", out.stdout).group(1))
    assert ran >= 3 and ran >= len(blocks) - 1  # at most the PyTorch block skipped, where torch is absent
