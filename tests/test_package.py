"""The package's shape: no import cycle, no reach into another module's private names, a lean
``import jaxlstm``, and a README API table that matches ``__all__``."""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxlstm"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports():
    """``{module: {(imported module, [names])}}`` for the package's own relative and absolute imports."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        mod = module_name(path)
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        edges = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "jaxlstm":
                    continue
                names = [a.name for a in node.names]
                # "from . import x" imports module x
                if node.module is None:
                    edges += [(f"{target}.{n}", []) for n in names]
                else:
                    edges.append((target, names))
            elif isinstance(node, ast.Import):
                edges += [(a.name, []) for a in node.names if a.name.split(".")[0] == "jaxlstm"]
        graph[mod] = edges
    return graph


def test_the_module_import_graph_has_no_cycle():
    graph = {m: {t for t, _ in edges if t != m} for m, edges in internal_imports().items()}
    # a package's __init__ importing its submodules is not a cycle back into them
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if t not in graph:
                continue
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t) :] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state and m.split(".")[-1] != "jaxlstm":
            visit(m)


def test_no_module_imports_another_modules_private_names():
    offenders = [
        f"{mod} imports {name} from {target}"
        for mod, edges in internal_imports().items()
        for target, names in edges
        for name in names
        if name.startswith("_") and target != mod
    ]
    assert offenders == []


def test_import_jaxlstm_loads_none_of_the_train_extra():
    code = (
        "import jaxlstm, jaxlstm.linen, jaxlstm.nnx, jaxlstm.interop, jaxlstm.losses, sys; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'orbax', 'matplotlib', 'tqdm'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "module", ["jaxlstm", "jaxlstm.linen", "jaxlstm.nnx", "jaxlstm.training", "jaxlstm.interop", "jaxlstm.losses"]
)
def test_the_api_reference_lists_exactly_the_public_names(module):
    """Each public module's page under docs/api lists its ``__all__``, no more and no less (each name
    then gets a page and an anchor of its own in the built site)."""
    import importlib

    page = (ROOT / "docs" / "api" / f"{module}.md").read_text()
    listed = set(re.findall(r"(?m)^   ([A-Za-z_][A-Za-z_0-9]*)$", page.split(".. autosummary::", 1)[1]))
    public = set(importlib.import_module(module).__all__) - {"__version__"}
    assert public - listed == set(), f"missing from docs/api/{module}.md: {sorted(public - listed)}"
    assert listed - public == set(), f"docs/api/{module}.md names what {module} does not export"
