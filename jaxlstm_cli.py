"""Entry point of the ``jaxlstm`` command.

It lives outside the ``jaxlstm`` package so that it can take over SIGINT and
SIGTERM before JAX is imported. A signal that arrives while the libraries load
is held until they have loaded (an exception raised inside a C extension's
initialisation would surface as a confusing ``ImportError``), and then ends
the command with one line instead of a traceback.
"""

import signal
import sys

_received = []


def _hold(signum, frame):
    _received.append(signum)


def main() -> int:
    for name in ("SIGINT", "SIGTERM"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _hold)
    from jaxlstm.app import cli

    cli.setup_process()
    return cli.main(pending_signal=_received[0] if _received else None)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
