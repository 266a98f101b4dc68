"""The command's errors: a problem with the user's input, and a stop before training started."""

from __future__ import annotations

import signal


class RunError(Exception):
    """A problem with the user's input (file, folder, options, run), reported as one line without a traceback."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the command before training started (nothing was written)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} before training started; nothing was written")
        self.signum = signum
