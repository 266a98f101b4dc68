"""The README's Python examples run as written, in order, in one namespace."""

import pathlib
import re

import jax

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_examples_run(peer_promotion):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    namespace = {}
    ran = 0
    with jax.enable_x64(False):  # as a user's session: JAX defaults
        for k, code in enumerate(blocks):
            if "import torch" in code and not have_torch:
                continue
            exec(compile(code, f"README block {k}", "exec"), namespace)
            ran += 1
    assert ran >= 3
