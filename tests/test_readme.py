"""The README's Python examples run as written, in order, in one namespace."""

import importlib.util
import pathlib
import re

import jax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run(peer_promotion):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    have_torch = importlib.util.find_spec("torch") is not None
    namespace = {}
    ran = 0
    with jax.enable_x64(False):  # as a user's session: JAX defaults
        for k, code in enumerate(blocks):
            if "import torch" in code and not have_torch:
                continue
            if not have_torch and "interop" in code and "import torch" not in code and "interop" not in namespace:
                from jaxlstm import interop

                namespace["interop"] = interop
                namespace.setdefault("xs", jax.numpy.ones((3, 5, 4)))
            exec(compile(code, f"README block {k}", "exec"), namespace)
            ran += 1
    assert ran >= 3
