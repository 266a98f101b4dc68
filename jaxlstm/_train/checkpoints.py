"""orbax checkpoints you can trust: written whole or not at all, checked by a digest, an intact fallback.

In several processes every process takes part in each save and restore (orbax
writes each array's shards from the process that holds them); the digest is
computed over the global values, the same on every process, so a checkpoint
does not depend on how many processes or devices wrote it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from . import parallel
from .steps import TrainState


class CheckpointError(Exception):
    """No checkpoint could be restored: none is there, none is intact, or they fit another model."""


def _digest(tree, extra: Any = None) -> str:
    """SHA-256 over every leaf's shape and values, in tree order (and ``extra``): detects any corruption.

    Values are widened first (floats to float64, integers to int64), exactly, so
    that a checkpoint restored into a wider dtype than it was saved in still
    matches its digest.
    """
    h = hashlib.sha256()
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True).encode())
    for leaf in jax.tree.leaves(tree):
        a = parallel.host_value(leaf)
        if np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16":
            a = a.astype(np.float64)
        elif np.issubdtype(a.dtype, np.integer):
            a = a.astype(np.int64)
        h.update(repr(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _all_finite(tree) -> bool:
    return all(
        bool(np.isfinite(parallel.host_value(a)).all())
        for a in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(a), jnp.inexact)
    )


def first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet_absl(active: bool):
    """absl (orbax's logger) above warnings while active."""
    import logging

    logger = logging.getLogger("absl")
    level = logger.level
    if active:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class Checkpointer:
    """orbax-checkpoint behind three calls: ``save``, ``latest_step``, ``restore``; checkpoints you can trust.

    Saves every ``save_every`` steps (and whenever forced), keeps the last
    ``keep``. What is saved is a pytree of arrays; :func:`fit` stores the train
    state (params, optimizer state, step), the rng and the carried state.

    * Each checkpoint is written to a temporary folder and renamed when
      complete (orbax), so a process killed while saving leaves the earlier
      checkpoints as they were; leftovers are removed on the next start.
    * Each checkpoint carries a SHA-256 of its arrays. :meth:`restore` checks
      it and falls back to the newest checkpoint that is intact and finite,
      reporting what it skipped through ``on_fallback``.
    * Non-finite values are never saved (``ValueError``).
    """

    def __init__(self, directory, *, save_every: int = 0, keep: int = 3, read_only: bool = False):
        import orbax.checkpoint as ocp

        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(
                f"keep must be a positive int (the newest checkpoints to keep); received {keep!r}. "
                "To write no checkpoints, pass no checkpoint folder."
            )
        self._ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        self.save_every = save_every
        self.keep = keep
        self.read_only = read_only
        self.skipped: list[int] = []  # the damaged checkpoints the last restore() passed over
        self.extra: Any = None  # the ``extra`` saved with the checkpoint the last restore() returned
        self._open()

    def _open(self) -> None:
        with _quiet_absl(self.read_only):  # orbax warns that a read-only directory is read only
            self._open_manager()

    def _open_manager(self) -> None:
        ocp = self._ocp
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if self.read_only else self.keep,
            save_interval_steps=0 if self.read_only else 1,
            enable_async_checkpointing=False,
            create=not self.read_only,
            read_only=self.read_only,
            cleanup_tmp_directories=not self.read_only,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def save(self, step: int, tree, *, force: bool = False, extra: Any = None) -> bool:
        """Save ``tree`` as step ``step`` if it is due (or ``force``); returns whether it saved.

        ``extra``: JSON-serialisable values saved with it (and covered by its checksum).
        """
        if not force and (not self.save_every or step % self.save_every):
            return False
        if step in self._manager.all_steps():
            return False
        if not _all_finite(tree):
            raise ValueError(f"refusing to save step {step}: it holds NaN or infinite values.")
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(tree),
            meta=self._ocp.args.JsonSave({"step": int(step), "sha256": _digest(tree, extra), "extra": extra}),
        )
        saved = self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        return bool(saved)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def _check_shapes(self, step: int, template) -> None:
        """The checkpoint holds the template's arrays, by name, shape and a dtype it restores into exactly."""
        meta = self._manager.item_metadata(step)["state"]
        meta = getattr(meta, "tree", meta)
        saved = {_path(p): m for p, m in jax.tree_util.tree_leaves_with_path(meta) if hasattr(m, "shape")}
        wanted = {_path(p): a for p, a in jax.tree_util.tree_leaves_with_path(template)}
        if not saved:
            raise _Corrupt("its metadata lists no arrays")
        if saved.keys() != wanted.keys():
            there, here = sorted(saved.keys() - wanted.keys()), sorted(wanted.keys() - saved.keys())
            raise _Mismatch(
                f"checkpoint {step} holds other arrays than this model's (only there: {', '.join(there[:3]) or '-'}; "
                f"only here: {', '.join(here[:3]) or '-'})"
            )
        for name, m in saved.items():
            shape, dtype = tuple(np.shape(wanted[name])), np.dtype(jnp.result_type(wanted[name]))
            if tuple(m.shape) != shape:
                raise _Mismatch(f"checkpoint {step} holds {name} of shape {tuple(m.shape)}; this model's is {shape}")
            old = np.dtype(m.dtype) if getattr(m, "dtype", None) is not None else dtype
            # a float restored into a narrower float loses digits (its digest then fails: "damaged"); an
            # integer into a narrower one is checked by the digest, which widens integers (the step counter
            # of a run saved with 64-bit integers enabled restores into 32 bits)
            if _kind(old) != _kind(dtype) or (_kind(old) == "float" and old.itemsize > dtype.itemsize):
                raise _Mismatch(f"checkpoint {step} holds {name} as {old}; this model holds it as {dtype}")

    def _restore_one(self, step: int, template):
        try:
            self._check_shapes(step, template)
        except _Mismatch:
            raise
        except Exception as e:  # unreadable metadata: a damaged checkpoint
            raise _Corrupt(f"its metadata cannot be read ({first_line(e, 80)})") from None
        abstract = jax.tree.map(_abstract, template)
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardRestore(abstract), meta=self._ocp.args.JsonRestore()
        )
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:
            raise _Corrupt(f"its data cannot be read ({first_line(e, 80)})") from None
        tree, meta = restored["state"], restored["meta"]
        if not isinstance(meta, Mapping) or meta.get("sha256") != _digest(tree, meta.get("extra")):
            raise _Corrupt("its data does not match the checksum written with it")
        if not _all_finite(tree):
            raise _Corrupt("it holds NaN or infinite values")
        self.extra = meta.get("extra")
        return tree

    def restore(self, step: int | None, template, *, on_fallback: Callable[[str], None] | None = None):
        """The checkpoint at ``step``, or (``step=None``) the newest intact one.

        Args:
          step: a step number, or ``None`` for the newest checkpoint that
            restores, matches its checksum and holds only finite values.
          template: a pytree with the shapes and dtypes to restore into.
          on_fallback: called with a one-line message for each checkpoint
            that was skipped as damaged.

        Returns:
          ``(step, tree)``.

        Raises:
          CheckpointError: no checkpoint, none intact, or they hold arrays of
            other shapes than ``template`` (a different model).
        """
        # one list for every process (a shared folder gives the same one; this makes it one choice)
        steps = [int(s) for s in parallel.same_on_every_process(self.all_steps() or [-1]) if s >= 0]
        if step is not None:
            steps = [s for s in steps if s == step]
        if not steps:
            where = f"step {step} in " if step is not None else ""
            raise CheckpointError(f"no checkpoint {where}{self.directory}.")
        problems = []
        self.skipped = []
        for s in reversed(steps):
            try:
                tree = self._restore_one(s, template)
            except _Mismatch as e:
                raise CheckpointError(f"{e}: it was written by another model.") from None
            except _Corrupt as e:
                problems.append(f"checkpoint {s} is damaged: {e}")
                self.skipped.append(s)
                if on_fallback is not None:
                    on_fallback(f"checkpoint {s} is damaged ({e}); trying an earlier one")
                continue
            return s, tree
        raise CheckpointError(f"no intact checkpoint in {self.directory}: " + "; ".join(problems) + ".")

    def set_aside(self, steps: Sequence[int], where) -> None:
        """Move damaged checkpoints out of the way (to ``where``) so that their steps can be saved again."""
        where = pathlib.Path(where)
        if parallel.is_writer():
            _move_aside(self.directory, steps, where)
        parallel.barrier("jaxlstm-set-aside")
        self._manager.close()
        self._open()

    def close(self) -> None:
        self._manager.close()


def _move_aside(directory: pathlib.Path, steps: Sequence[int], where: pathlib.Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    for s in steps:
        src = directory / str(s)
        if src.exists():
            dst = where / str(s)
            k = 1
            while dst.exists():
                dst, k = where / f"{s}.{k}", k + 1
            os.replace(src, dst)


class _Corrupt(Exception):
    pass


class _Mismatch(Exception):
    pass


def _kind(dtype: np.dtype) -> str:
    """float (bfloat16 included), signed or unsigned integer, bool, or other."""
    for kind, base in (("float", jnp.floating), ("int", jnp.signedinteger), ("uint", jnp.unsignedinteger)):
        if jnp.issubdtype(dtype, base):
            return kind
    return dtype.kind


def _path(path) -> str:
    """A key path as ``a/b/0/c``, the same for a template (attributes, indices) and orbax's metadata (dict keys)."""
    parts = []
    for k in path:
        for field in ("key", "idx", "name"):
            if hasattr(k, field):
                parts.append(str(getattr(k, field)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _abstract(a: Any) -> jax.ShapeDtypeStruct:
    """The restore target of a template leaf: its shape, dtype and (for a jax.Array) its sharding."""
    sharding = a.sharding if isinstance(a, jax.Array) else None
    return jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a), sharding=sharding)


def snapshot(state: TrainState, rng, carry) -> dict:
    """What :func:`fit` checkpoints: params, optimizer state, step, rng and carry, as a pytree of arrays."""
    return {
        "train_state": flax.serialization.to_state_dict({"params": state.params, "opt_state": state.opt_state}),
        "step": jnp.asarray(state.step, jnp.int64 if jax.config.read("jax_enable_x64") else jnp.int32),
        "rng": jax.random.key_data(rng),
        "carry": carry,
    }


def from_snapshot(template_state: TrainState, snap: dict, carry_template):
    """``(state, rng, carry)`` from a :func:`snapshot` (restored into ``template_state``'s structure)."""
    restored = flax.serialization.from_state_dict(
        {"params": template_state.params, "opt_state": template_state.opt_state}, snap["train_state"]
    )
    state = template_state.replace(step=int(snap["step"]), params=restored["params"], opt_state=restored["opt_state"])
    carry = snap["carry"] if carry_template is not None else None
    return state, jax.random.wrap_key_data(snap["rng"]), carry
