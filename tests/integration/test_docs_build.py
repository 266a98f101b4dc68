"""The documentation site builds strictly (every warning an error, cross-references checked), each
public name has its own anchor, and the notebooks are rendered from their stored outputs."""

import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODULES = ["jaxlstm", "jaxlstm.linen", "jaxlstm.nnx", "jaxlstm.training", "jaxlstm.interop", "jaxlstm.losses"]

pytest.importorskip("sphinx", reason="the docs extra: pip install -e '.[docs]'")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html", "docs", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


def test_every_public_name_has_its_own_anchor(site):
    missing = []
    for module in MODULES:
        for name in importlib.import_module(module).__all__:
            if name == "__version__":
                continue
            page = site / "api" / "generated" / f"{module}.{name}.html"
            if not page.is_file() or f'id="{module}.{name}"' not in page.read_text(encoding="utf-8"):
                missing.append(f"{module}.{name}")
    assert missing == []


def test_cross_references_resolve_to_the_api_pages(site):
    page = (site / "api" / "generated" / "jaxlstm.nnx.LSTM.html").read_text(encoding="utf-8")
    assert 'href="jaxlstm.linen.LSTM.html#jaxlstm.linen.LSTM"' in page  # "as in jaxlstm.linen.LSTM"


def test_notebooks_are_rendered_with_their_stored_outputs_and_guides_are_pages(site):
    import html
    import json

    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        page = (site / "notebooks" / f"{nb.stem}.html").read_text(encoding="utf-8")
        outputs = [o for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
        images = sum("image/png" in o.get("data", {}) for o in outputs)
        assert page.count("<img") >= images, nb.stem  # every stored figure
        texts = ["".join(o["text"]).strip() for o in outputs if o.get("output_type") == "stream"]
        first = next((t.splitlines()[0] for t in texts if t), None)
        assert images or first, nb.stem  # a notebook with no stored output would render nothing to check
        if first:
            assert html.escape(first, quote=False) in page, (nb.stem, first)  # stored text, not executed
    for guide in sorted((ROOT / "docs" / "guides").glob("*.md")):
        assert (site / "guides" / f"{guide.stem}.html").is_file(), guide.stem
