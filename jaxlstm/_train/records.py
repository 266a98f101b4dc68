"""What a run reports: the logging window, the metrics file, TensorBoard events, the progress bar.

In several processes only process 0 writes files and draws the bar; every
process keeps the same records in memory (the values come from global arrays).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import parallel


def json_line(entry: dict) -> str:
    """One JSON line that strict parsers accept: NaN and infinities are written as ``null``."""
    clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in entry.items()}
    return json.dumps(clean, allow_nan=False)


def read_metrics(path, upto: int | None = None) -> list:
    """The rows of a JSON-lines metrics file (with ``step <= upto``); a damaged (e.g. half-written) line is dropped."""
    path = pathlib.Path(path)
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and (upto is None or row["step"] <= upto):
                rows.append(row)
    return rows


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader sees the old or the new file."""
    path = pathlib.Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: two writers never share it
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Window:
    """The metrics summed since the last training record: a record holds their means."""

    def __init__(self, saved: Mapping | None = None):
        saved = saved or {}
        self.count: int = int(saved.get("count", 0))
        self.sums: dict = dict(saved.get("sums", {}))

    def add(self, values: Mapping[str, float]) -> None:
        self.count += 1
        self.sums = {k: self.sums.get(k, 0.0) + v for k, v in values.items()}

    def mean(self, key: str) -> float | None:
        return self.sums[key] / self.count if key in self.sums and self.count else None

    def close(self) -> dict:
        """The means over the window, which starts anew."""
        means = {k: v / self.count for k, v in self.sums.items()} if self.count else {}
        self.count, self.sums = 0, {}
        return means

    def state(self) -> dict:
        """What a checkpoint keeps of it (a resumed run's first record then equals an uninterrupted run's)."""
        return {"count": self.count, "sums": dict(self.sums)}


class Records:
    """Each record goes to the history, the metrics file, TensorBoard and ``on_record``.

    Opening cuts the metrics file back to ``start`` (a resumed run rewrites what
    follows) and TensorBoard discards the events past it.
    """

    def __init__(self, *, start: int, metrics_path=None, tensorboard_dir=None, on_record: Callable | None = None):
        self.history: list = []
        self.evaluated: set = set()  # steps with an evaluation row in the metrics file
        self._on_record = on_record
        self._file = None
        self._board = None
        writer = parallel.is_writer()
        if metrics_path is not None:
            path = pathlib.Path(metrics_path)
            rows = read_metrics(path, start) if path.exists() else []
            self.evaluated = {r["step"] for r in rows if any(k.startswith("eval_") for k in r)}
            if writer:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, "".join(json_line(r) + "\n" for r in rows))
                self._file = open(path, "a", encoding="utf-8")
            parallel.barrier("jaxlstm-metrics-cut")  # every process has read the file before any writes it
        if tensorboard_dir is not None and writer:
            from tensorboardX import SummaryWriter

            self._board = SummaryWriter(str(tensorboard_dir), purge_step=start + 1 if start else None)

    def write(self, entry: dict) -> None:
        self.history.append(entry)
        if self._file is not None:
            self._file.write(json_line(entry) + "\n")
            self._file.flush()
        if self._board is not None:
            for k, v in entry.items():
                if k not in ("step", "time_s") and isinstance(v, (int, float)):
                    self._board.add_scalar(k, v, entry["step"])
            self._board.flush()
        if any(k.startswith("eval_") for k in entry):
            self.evaluated.add(entry["step"])
        if self._on_record is not None:
            self._on_record(entry)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._board is not None:
            self._board.close()
            self._board = None


class Progress:
    """A tqdm bar (process 0, when ``enabled``) with the mean of one metric over the logging window.

    :meth:`outside` wraps a callback so that what it writes goes above the bar.
    """

    def __init__(self, total: int, *, enabled: bool, metric: str):
        from tqdm import tqdm  # the text bar: it needs no notebook widgets

        self._tqdm = tqdm
        self.enabled = enabled and parallel.is_writer()
        self.metric = metric
        self.bar = tqdm(total=total, desc="train", unit="step", disable=not self.enabled, dynamic_ncols=True)

    def start(self, total: int, at: int) -> None:
        self.bar.reset(total=total)
        self.bar.update(at)

    def step(self, window: Window) -> None:
        self.bar.update(1)
        mean = window.mean(self.metric)
        if mean is not None:
            self.bar.set_postfix({self.metric: f"{mean:.4f}"})

    def outside(self, fn: Callable | None) -> Callable | None:
        """``fn`` with the bar cleared while it writes (``fn`` itself without a bar)."""
        if fn is None or not self.enabled:
            return fn
        tqdm = self._tqdm

        def wrapped(*args: Any) -> Any:
            with tqdm.external_write_mode():
                return fn(*args)

        return wrapped

    def write(self, text: str) -> None:
        if parallel.is_writer():
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
