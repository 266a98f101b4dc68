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

On a mesh with Explicit axes (``jax.make_mesh``'s default) an array's sharding
is part of its type instead: the zeros the layer makes for a state take the
batch sharding of its input (:func:`explicit_like`), and a dot that sums over
a split batch names its output's sharding (:func:`outer_sharding`).
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


def _explicit_spec(leaf: Any) -> Any:
    """The ``PartitionSpec`` of ``leaf`` where it is sharded over mesh axes of type Explicit, else ``None``."""
    t = _typeof(leaf) if _typeof is not None else None
    sharding = getattr(t, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or not any(e is not None for e in spec):
        return None
    return spec


def explicit_like(state: Any, xs: Any, batch_axis: int | None) -> Any:
    """Zeros made for a carry, sharded over ``xs``'s batch axis where ``xs`` is (on a mesh with Explicit axes).

    Under explicit sharding an array's sharding is part of its type: a zero state made without one
    is replicated, and mixing it with a batch split over devices is a type error. Elsewhere (and for an
    unbatched ``xs``, ``batch_axis=None``) an identity.
    """
    spec = _explicit_spec(xs)
    if spec is None or batch_axis is None:
        return state
    batch = spec[batch_axis] if batch_axis < len(spec) else None
    return jax.tree.map(
        lambda leaf: jax.sharding.reshard(leaf, jax.sharding.PartitionSpec(batch, *([None] * (leaf.ndim - 1)))),
        state,
    )


def outer_sharding(a: Any, b: Any) -> Any:
    """``out_sharding`` for a dot that sums over sharded leading axes of ``a`` and ``b``: replicated, where
    either is sharded over Explicit mesh axes (JAX asks for it to be named); ``None`` elsewhere."""
    if _explicit_spec(a) is None and _explicit_spec(b) is None:
        return None
    return jax.sharding.PartitionSpec(None, None)
