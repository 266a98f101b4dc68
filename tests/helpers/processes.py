"""The environment for the slow tier's short-lived subprocesses (notebooks, scripts, the README)."""

import os
import queue
import subprocess
import threading
import time

#: These runs are compile-bound (each program runs a few steps): LLVM's cheaper optimisation level
#: halves their compile time and changes nothing they check. Runs whose speed or numbers are compared
#: (the fault-injection runs against their reference) keep the default.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def fast_compile_env(**extra: str) -> dict:
    """``os.environ`` plus :data:`FAST_COMPILE_FLAGS` (after any XLA flags already set) and ``extra``."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FAST_COMPILE_FLAGS not in flags:
        flags = " ".join(f for f in (flags, FAST_COMPILE_FLAGS) if f)
    return dict(os.environ, XLA_FLAGS=flags, **extra)


def default_compile_env(**extra: str) -> dict:
    """``os.environ`` without :data:`FAST_COMPILE_FLAGS` (which the test session sets), plus ``extra``:
    for runs bound by run time rather than compile time."""
    flags = " ".join(os.environ.get("XLA_FLAGS", "").replace(FAST_COMPILE_FLAGS, "").split())
    env = dict(os.environ, **extra)
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env


class Process:
    """A subprocess whose output lines (stdout and stderr together) are read as they come."""

    def __init__(self, cmd, *, env: dict):
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, text: str, timeout: float = 240) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(text in ln for ln in self.lines):
                return True
            try:
                if self._q.get(timeout=0.05) is None:
                    return any(text in ln for ln in self.lines)
            except queue.Empty:
                pass
        return False

    def finish(self, timeout: float = 300) -> int:
        rc = self.p.wait(timeout=timeout)
        self._reader.join(timeout=10)
        self.p.stdout.close()
        return rc

    @property
    def output(self) -> str:
        return "\n".join(self.lines)
