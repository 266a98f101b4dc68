"""Inside ``jax.shard_map``: the arrays a scan combines share their varying mesh axes.

Under ``shard_map`` every value carries the set of mesh axes along which it
varies (``jax.typeof(x).manual_axis_type.varying``; ``.vma`` before JAX
0.10): a batch sharded over ``"b"`` varies along ``"b"``, replicated weights
and a zero initial state do not. ``lax.scan`` requires its carry to keep one
type, but a step that mixes a varying input into an invariant state returns a
varying one. So the layer casts its inputs (and the zeros it creates for a
carry) to the union of their axes before it scans: :func:`common` and
:func:`vary`. Autodiff turns the cast of the weights into a sum over the mesh
axes (the gradient of replicated weights). Outside ``shard_map`` no value
varies and these are identities.
"""

from __future__ import annotations

from typing import Any

import jax

_typeof = getattr(jax, "typeof", None)
_pcast: Any = getattr(jax.lax, "pcast", None)
_pvary: Any = getattr(jax.lax, "pvary", None)  # its name before JAX 0.8.2


def _varying(leaf: Any) -> frozenset[str]:
    """The mesh axes along which ``leaf`` varies (``manual_axis_type.varying``; ``vma`` before JAX 0.10)."""
    t = _typeof(leaf) if _typeof is not None else None
    kind = getattr(t, "manual_axis_type", None)
    if kind is not None:
        return frozenset(kind.varying)
    return frozenset(getattr(t, "vma", ()))


def axes(*trees: Any) -> tuple[str, ...]:
    """The mesh axes along which any array leaf of ``trees`` varies (sorted; empty outside ``shard_map``)."""
    names: set[str] = set()
    for leaf in jax.tree.leaves(trees):
        names |= _varying(leaf)
    return tuple(sorted(names))


def vary(tree: Any, names: tuple[str, ...]) -> Any:
    """``tree`` with every array leaf cast to vary along all of ``names`` (those it varies along already kept)."""
    if not names:
        return tree

    def cast(leaf: Any) -> Any:
        missing = tuple(n for n in names if n not in _varying(leaf))
        if not missing:
            return leaf
        if _pcast is not None:
            return _pcast(leaf, missing, to="varying")
        return _pvary(leaf, missing)

    return jax.tree.map(cast, tree)


def common(*trees: Any) -> tuple[Any, ...]:
    """``trees`` with every array leaf cast to the union of the axes any of them varies along."""
    names = axes(*trees)
    return tuple(vary(t, names) for t in trees)
