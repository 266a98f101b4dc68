"""SIGINT and SIGTERM as a request to stop at the next safe point, agreed by every process of a run."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

from . import parallel


class StopRequest:
    """SIGINT and SIGTERM turned into a request to stop at the next safe point.

    The first signal sets ``signal`` and returns: the step in flight
    finishes, is saved, and the loop stops. A second signal raises
    ``KeyboardInterrupt`` at once (for a user who cannot wait), except inside
    a :meth:`deferred` block, which it ends first (:func:`fit` runs each step
    and its bookkeeping in one); :func:`fit` then saves the state only if it
    is intact, and the earlier checkpoints stay as they were in any case.
    Outside the main thread, where Python cannot install handlers, it does
    nothing.
    """

    def __init__(self, notify: Callable[[str], None] | None = None):
        self.signal: int | None = None
        self._notify = notify
        self._old: dict = {}
        self._deferring = 0
        self._pending = False

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block that a second signal does not cut: it raises ``KeyboardInterrupt`` when the block ends.

        :func:`fit` runs a step and its bookkeeping (step count, logging window,
        records) in one, so that what it saves after a second Ctrl-C is
        consistent: a step's metrics are counted if and only if its state is.
        """
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self._pending and not self._deferring:
            self._pending = False
            raise KeyboardInterrupt

    def agree(self) -> int | None:
        """The signal that stops the run, the same on every process (a collective in several processes).

        A signal that reached any one process stops all of them after the same step; in one
        process this is ``signal``.
        """
        if parallel.processes() == 1:
            return self.signal
        agreed = parallel.largest_over_processes(self.signal or 0)
        if agreed and self.signal is None:
            self.signal = agreed
            if self._notify is not None:
                name = signal.Signals(agreed).name
                self._notify(f"another process of the run received {name}: stopping after this step with it")
        return self.signal

    def _handle(self, signum, frame):
        if self.signal is not None:
            if self._deferring:
                self._pending = True
                return
            raise KeyboardInterrupt
        self.signal = signum
        if self._notify is not None:
            name = signal.Signals(signum).name
            self._notify(
                f"{name} received: stopping after the current step and saving it (send it again to stop at once)"
            )

    _active: StopRequest | None = None

    @classmethod
    def current(cls) -> StopRequest | None:
        """The request installed by an enclosing ``with StopRequest()``, if any (main thread)."""
        return cls._active

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._outer, StopRequest._active = StopRequest._active, self
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not signal.SIG_IGN:  # a signal the process ignores (nohup) stays ignored
                    self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        if threading.current_thread() is threading.main_thread():
            StopRequest._active = self._outer
        self._old.clear()
