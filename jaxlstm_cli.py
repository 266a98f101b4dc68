"""Entry point of the ``jaxlstm`` command.

It lives outside the ``jaxlstm`` package so that it can take over SIGINT and
SIGTERM before JAX is imported. A signal that arrives while the libraries load
is held until they have loaded (an exception raised inside a C extension's
initialisation would surface as a confusing ``ImportError``), and then ends
the command with one line instead of a traceback.

A ``train`` that joins other processes (``--coordinator``, ``--num-processes``,
``--distributed-auto``) runs as a child of this process. JAX's distributed
runtime ends a process whose partner or coordinator is gone by aborting it
(a C++ log line and a stack trace); here the child's stderr passes through
with those lines folded into one, signals are passed on to the child, and the
child dies with this process.
"""

import os
import re
import signal
import subprocess
import sys
import threading

_received = []

_DISTRIBUTED = ("--coordinator", "--num-processes", "--distributed-auto")
#: lines of JAX's C++ runtime (glog lines, check-failure traces, gRPC details) and gloo's greeting
_RUNTIME_LINE = re.compile(
    r"^([FEW]\d{4} \d\d:\d\d:\d\d|\*\*\* |\s+@\s|Additional GRPC|:UNKNOWN:|RPC: "
    r"|terminate called|\s+what\(\):|\[Gloo\])"
)


def _hold(signum, frame):
    _received.append(signum)


def _distributed(argv) -> bool:
    return bool(argv) and argv[0] == "train" and any(a.split("=")[0] in _DISTRIBUTED for a in argv)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _reason(line: str) -> str:
    text = re.sub(r"^[FEW]\d{4} \S+\s+\d+ \S+\] ", "", line).strip()
    status = re.search(r"absl::Status: (.*)", text)
    if "Terminating process because the JAX distributed service detected fatal errors" in text:
        why = status.group(1).strip() if status else ""
        if "DEADLINE_EXCEEDED" in why:
            return (
                "a process of the run did not answer in time: one missing at start-up (--init-timeout) "
                f"or gone since (--heartbeat-timeout) ({why})"
            )
        if "incarnation" in why:
            return f"two processes were given the same --process-id, or one was restarted ({why})"
        return f"another process of the run is gone, or the coordinator cannot be reached ({why or 'no detail'})"
    return text[:200]


class _Relay:
    """Copies a child's output stream to ours as it comes (progress-bar frames included), leaving out
    the runtime's own lines and keeping its first fatal and error line."""

    def __init__(self, source, target, *, drop_blank: bool):
        self.source, self.target, self.drop_blank = source, target, drop_blank
        self.fatal: str | None = None
        self.error: str | None = None
        self.reported = False  # the command wrote its own error line
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _segment(self, text: str) -> None:
        if _RUNTIME_LINE.match(text) or (self.drop_blank and not text.strip()):
            if self.fatal is None and text.startswith("F"):
                self.fatal = _reason(text)
            elif self.error is None and text.startswith("E"):
                self.error = _reason(text)
            return
        self.reported = self.reported or text.startswith("jaxlstm")
        self.target.write(text)
        self.target.flush()

    def _run(self) -> None:
        pending = ""
        while True:
            chunk = os.read(self.source.fileno(), 65536)
            if not chunk:
                break
            pending += chunk.decode("utf-8", errors="replace")
            parts = re.split(r"(?<=[\r\n])", pending)
            pending = parts.pop()  # not ended yet
            for part in parts:
                self._segment(part)
        if pending:
            self._segment(pending)


def _supervise(argv) -> int:
    """Run ``jaxlstm train`` in a child; its runtime aborts become one line on stderr."""
    launcher = "import sys, jaxlstm_cli; sys.exit(jaxlstm_cli.main())"
    child = subprocess.Popen(
        [sys.executable, "-c", launcher, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent,
        start_new_session=True,  # a Ctrl-C at the terminal reaches the child once, through this process
    )
    for name in ("SIGINT", "SIGTERM"):
        signal.signal(getattr(signal, name), lambda signum, frame: child.send_signal(signum))
    for signum in _received:
        child.send_signal(signum)
    out = _Relay(child.stdout, sys.stdout, drop_blank=False)
    err = _Relay(child.stderr, sys.stderr, drop_blank=True)  # the runtime's blank lines around its own
    rc = child.wait()
    for relay in (out, err):
        relay.thread.join(timeout=10)
    fatal = err.fatal or out.fatal
    error = err.error or out.error
    aborted = rc in (134, -signal.SIGABRT)
    if (aborted or (rc not in (0, 130, 143) and (fatal or error))) and not err.reported:
        why = fatal or error or "aborted"
        print(f"jaxlstm train: error: JAX's distributed runtime ended this process: {why}", file=sys.stderr)
        return 1
    return 128 - rc if rc < 0 else rc


def main() -> int:
    for name in ("SIGINT", "SIGTERM"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _hold)
    if _distributed(sys.argv[1:]) and "JAXLSTM_SUPERVISED" not in os.environ:
        os.environ["JAXLSTM_SUPERVISED"] = "1"  # the child runs the command itself
        return _supervise(sys.argv[1:])
    from jaxlstm.app import cli

    cli.setup_process()
    return cli.main(pending_signal=_received[0] if _received else None)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
