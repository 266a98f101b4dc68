"""Meshes and processes: the state replicated, the batch split along ``"data"``, one program everywhere.

In one process this is ``jax.device_put``. In several (``jax.distributed.initialize``),
every array that enters a step must be a global array over the whole mesh: the
state and PRNG key are built from the value every process holds, and each
process contributes only the rows of a batch that its own devices hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA = "data"


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process) with the axis name ``"data"``.

    Example:
      >>> from jaxlstm.training import data_mesh
      >>> data_mesh().axis_names
      ('data',)
    """
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA,))


def auto_axes(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis of type Auto (``jax.make_mesh`` makes Explicit ones by default).

    :func:`fit` makes one sharding itself, the batch split over ``"data"``, and lets XLA propagate it
    through the model, whatever the model does; under Explicit axes every operation of the model would
    have to state how its output is sharded (Flax's ``nn.Embed`` does not, for one).
    """
    types = getattr(mesh, "axis_types", None)
    if types is None or all(t == AxisType.Auto for t in types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def processes() -> int:
    return jax.process_count()


def is_writer() -> bool:
    """Whether this process writes the run's files (metrics, TensorBoard, progress): process 0."""
    return jax.process_index() == 0


def check_mesh(mesh: Mesh | None) -> None:
    if mesh is None:
        if processes() > 1:
            raise ValueError(
                f"fit runs in {processes()} processes but received no mesh: pass mesh=data_mesh() "
                "(every device of every process) so that the processes train one model together."
            )
        return
    if not isinstance(mesh, Mesh) or DATA not in mesh.axis_names:
        names = getattr(mesh, "axis_names", None)
        raise ValueError(
            f"mesh must be a jax.sharding.Mesh with a {DATA!r} axis (data_mesh() builds one); received "
            f"{type(mesh).__name__} with axes {names}."
        )


def _on_mesh(a: Any, mesh: Mesh) -> bool:
    if not isinstance(a, jax.Array) or a.sharding.device_set != set(mesh.devices.flat):
        return False
    other = getattr(a.sharding, "mesh", None)  # placed on the same devices, but with Explicit axes: placed again
    return getattr(other, "axis_types", None) in (None, mesh.axis_types)


def _global(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    if processes() == 1:
        return jax.device_put(host, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree, mesh: Mesh):
    """Every leaf of ``tree`` replicated on every device of ``mesh`` (a leaf already on it stays as it is).

    In several processes each must hold the same values (the same initialisation seed).
    """
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(a):
        if _on_mesh(a, mesh):
            return a
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(a)), impl=jax.random.key_impl(a))
        return _global(np.asarray(a), sharding)

    return jax.tree.map(put, tree)


def _rows_error(shape, n: int, where: str) -> ValueError:
    return ValueError(
        f"a batch array of shape {tuple(shape)} cannot be split over {n} {where} along its first axis; "
        f"use a batch size divisible by {n}."
    )


def shard_batch(tree, mesh: Mesh, *, process_local: bool = False):
    """Each leaf split along its first axis over the mesh's ``"data"`` axis.

    Args:
      tree: the global batch (``process_local=False``; every process computes the same one and
        keeps only the rows its devices hold), or this process's rows of it (``process_local=True``:
        the processes' rows, in process order, make the global batch).
    """
    n = mesh.shape[DATA]
    sharding = NamedSharding(mesh, PartitionSpec(DATA))

    def put(a):
        if _on_mesh(a, mesh) and getattr(a, "sharding", None) == sharding:
            return a
        if process_local:
            local = np.asarray(a)
            per_process = n // processes()
            if local.ndim == 0 or local.shape[0] % max(per_process, 1):
                raise _rows_error(local.shape, per_process, "devices of this process")
            return jax.make_array_from_process_local_data(sharding, local)
        shape = np.shape(a)
        if len(shape) == 0 or shape[0] % n:
            raise _rows_error(shape, n, "devices")
        if processes() == 1:
            return jax.device_put(a, sharding)
        return _global(np.asarray(a), sharding)

    return jax.tree.map(put, tree)


def host_value(a: Any) -> np.ndarray:
    """``a`` as a NumPy array on every process (gathered where this process holds only part of it)."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)


def largest_over_processes(value: int) -> int:
    """The largest of an integer over every process (``value`` itself in one process): a collective."""
    if processes() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def same_on_every_process(value: Any) -> Any:
    """Process 0's ``value`` (an int or a list of ints), on every process: one choice, shared."""
    if processes() == 1:
        return value
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)).tolist()


def barrier(name: str) -> None:
    if processes() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class PartnerLost(RuntimeError):
    """Another process of the run died or could not be reached (a collective failed)."""


_LOST = ("gloo", "connection reset", "connection closed", "connection refused", "broken pipe", "unavailable")


def partner_lost(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another process is gone."""
    if processes() == 1:
        return False
    text = str(e).lower()
    return any(word in text for word in _LOST)


def on_writer(fn: Callable | None) -> Callable | None:
    """``fn`` on process 0, a no-op elsewhere."""
    if fn is None or is_writer():
        return fn
    return lambda *args, **kwargs: None
