"""The run folder: what a run writes there, the lock, and removing only what a run wrote."""

from __future__ import annotations

import os
import pathlib
import shutil

from .config import read_json_config
from .errors import RunError

LOCK_NAME = ".jaxlstm.lock"


#: Everything a run writes in its folder; ``--overwrite`` removes these and nothing else.
RUN_FILES = (
    "config.json",
    "checkpoints",
    "checkpoints.damaged",
    "best",
    "metrics.jsonl",
    "loss.png",
    "sample.txt",
)


def has_run(out: pathlib.Path) -> bool:
    return read_json_config(out / "config.json") is not None


def checkpoint_steps(out: pathlib.Path, folder: str = "checkpoints") -> list[int]:
    """The steps saved in ``out/folder`` (``checkpoints``, or ``best``)."""
    d = out / folder
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def remove_run_files(out: pathlib.Path) -> None:
    for name in RUN_FILES:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


class RunLock:
    """An exclusive lock on a run folder (``fcntl.flock``: released by the OS when the process dies)."""

    def __init__(self, out: pathlib.Path):
        self.path = out / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"cannot write in the run folder {self.path.parent}: {e.strerror}.") from None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock
            self._fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(
                f"another jaxlstm process (pid {other}) is training in {self.path.parent}; wait for it to finish "
                "or choose another --out."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None


def clean_failed_start(out: pathlib.Path, created: bool, preexisting: set) -> None:
    """A start that failed before its first checkpoint leaves behind nothing it wrote (nor a folder it made)."""
    try:
        for name in RUN_FILES + (LOCK_NAME,):
            p = out / name
            if name in preexisting or not (p.exists() or p.is_symlink()):
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if created and not any(out.iterdir()):
            out.rmdir()
    except OSError:
        pass
