"""Starting JAX for the command: CPU devices, and several processes on JAX's distributed runtime.

Everything here runs before JAX creates its backends (the number of CPU devices
and the distributed runtime can only be set then).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


class LaunchError(Exception):
    """The processes could not be started together (one line for the user)."""


@dataclass
class Launch:
    cpu_devices: int | None = None  # None: automatic (see resolve_cpu_devices)
    coordinator: str | None = None  # HOST:PORT of process 0
    num_processes: int | None = None
    process_id: int | None = None
    auto_detect: bool = False  # let JAX find the cluster (SLURM, TPU pods, cloud, ...)
    init_timeout: int = 300
    heartbeat_timeout: int = 100

    @property
    def distributed(self) -> bool:
        return self.auto_detect or self.coordinator is not None or (self.num_processes or 1) > 1


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def resolve_cpu_devices(launch: Launch, batch_size: int) -> int:
    """CPU devices for this process: as given, or one per usable core up to two, and never more than the
    batch splits into (one in several processes).

    The main job measured faster split over two CPU devices on a 2-core machine: ``python
    benchmarks/scaling.py`` (``benchmarks/results/scaling.md``). More than two were not measured.
    """
    if launch.cpu_devices is not None:
        return launch.cpu_devices
    if launch.distributed:
        return 1
    n = min(usable_cores(), 2)
    while n > 1 and batch_size % n:
        n -= 1
    return n


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(
            f"--coordinator must be HOST:PORT (e.g. 10.0.0.1:1234 or localhost:1234); received {address!r}."
        )
    return host.strip("[]"), int(port)


def _check_coordinator(launch: Launch) -> None:
    """What JAX would otherwise report by aborting the process: an address nobody serves, a taken port."""
    assert launch.coordinator is not None
    host, port = _split_address(launch.coordinator)
    if launch.process_id == 0:
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("", port))
        except OSError as e:
            raise LaunchError(
                f"process 0 cannot serve the coordinator on port {port} ({e.strerror}): another program holds it, "
                "or another process was also given --process-id 0. Choose a free port or check the process ids."
            ) from None
        return
    import time

    deadline = time.monotonic() + launch.init_timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise LaunchError(
                    f"no coordinator answered at {launch.coordinator} within {launch.init_timeout} s ({e.strerror}): "
                    "start process 0 with the same --coordinator, or check the address (--init-timeout sets the wait)."
                ) from None
            time.sleep(0.5)


def start(launch: Launch, batch_size: int) -> None:
    """Set the CPU devices and join the other processes; call before anything uses JAX's devices."""
    import jax

    n = resolve_cpu_devices(launch, batch_size)
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        # JAX already started in this process (a caller of cli.main): its devices stay as they are
        if launch.distributed or (launch.cpu_devices is not None and launch.cpu_devices != len(jax.devices("cpu"))):
            raise LaunchError(
                "JAX has already started in this process, so its devices can no longer be chosen: run the "
                "jaxlstm command in a process of its own for --cpu-devices or several processes."
            ) from None
        return
    if not launch.distributed:
        return
    if not launch.auto_detect:
        if launch.coordinator is None or launch.num_processes is None or launch.process_id is None:
            raise LaunchError(
                "several processes need --coordinator, --num-processes and --process-id (or --distributed-auto)."
            )
        if not 0 <= launch.process_id < launch.num_processes:
            raise LaunchError(
                f"--process-id must lie in [0, {launch.num_processes}) for --num-processes {launch.num_processes}; "
                f"received {launch.process_id}."
            )
        _check_coordinator(launch)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # collectives between CPU processes
    try:
        jax.distributed.initialize(
            launch.coordinator,
            launch.num_processes,
            launch.process_id,
            initialization_timeout=launch.init_timeout,
            heartbeat_timeout_seconds=launch.heartbeat_timeout,
        )
    except (ValueError, RuntimeError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LaunchError(f"cannot join the other processes: {text}") from None
