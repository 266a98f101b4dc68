"""Sphinx configuration: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``."""

from __future__ import annotations

import importlib.metadata
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parents[1]

project = "jaxlstm"
author = "the jaxlstm authors"
copyright = "2026, the jaxlstm authors"
release = importlib.metadata.version("jaxlstm")
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
]

# the notebooks live at the top of the repository; the pages render their stored outputs
_NOTEBOOKS = ROOT / "notebooks"
_COPY = pathlib.Path(__file__).parent / "notebooks"
_COPY.mkdir(exist_ok=True)
for nb in sorted(_NOTEBOOKS.glob("*.ipynb")):
    target = _COPY / nb.name
    if not target.exists() or target.read_bytes() != nb.read_bytes():
        shutil.copyfile(nb, target)

nb_execution_mode = "off"  # rendered from the outputs stored in each notebook; nothing runs at build time
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # a NamedTuple's fields are documented by autodoc; "Attributes:" becomes fields
add_module_names = False

nitpicky = True
# names the docstrings mention that no inventory here resolves (type aliases and third-party internals)
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|flax|optax|orbax|numpy|np|jnp|torch|keras|equinox|haiku)(\..*)?"),
    (r"py:.*", r"(Array|ArrayLike|Any|Callable|Sequence|Mapping|Iterator|Iterable|PRNGKey|Initializer|Bptt)"),
    (r"py:.*", r"(optional|callable|pytree|array|arrays|dtype|int|float|bool|str|tuple|list|dict|None)"),
    (r"py:class", r".*\._.*"),
    (r"py:.*", r"(collections|pathlib|typing|types|os|signal)(\..*)?"),
    (r"py:class", r"ArrayTree"),
]

html_theme = "sphinx_book_theme"
html_title = "jaxlstm"
html_theme_options = {"show_toc_level": 2}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "notebooks/run.py"]
suppress_warnings = ["mystnb.unknown_mime_type"]
templates_path = ["_templates"]
