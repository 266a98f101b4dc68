"""When to evaluate, which evaluation is the best so far, and when to stop early."""

from __future__ import annotations

from collections.abc import Callable, Mapping


def check_patience(patience) -> None:
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be a positive int (evaluations without improvement); received {patience!r}.")


class Schedule:
    """Evaluations every ``every`` steps (0: never between) and at ``num_steps``, each step at most once."""

    def __init__(self, eval_fn: Callable | None, every: int, num_steps: int):
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"eval_every must be an int >= 0 (0: only at the end); received {every!r}.")
        self.eval_fn = eval_fn
        self.every = every
        self.num_steps = num_steps

    def due(self, at: int, evaluated: set) -> bool:
        return (
            self.eval_fn is not None
            and at not in evaluated
            and (at == self.num_steps or (bool(self.every) and at % self.every == 0 and at > 0))
        )

    def run(self, state) -> dict:
        assert self.eval_fn is not None
        values = self.eval_fn(state)
        if not isinstance(values, Mapping):
            raise TypeError(f"eval_fn must return a dict of scalars; it returned a {type(values).__name__}.")
        return {f"eval_{k}": float(v) for k, v in values.items()}


class Best:
    """The best (lowest) value of ``metric`` so far, and how many evaluations have passed since it.

    ``patience``: the number of evaluations in a row without a better value after
    which :meth:`observe` asks to stop (``None``: never).
    """

    def __init__(self, metric: str, patience: int | None, saved: Mapping | None = None):
        check_patience(patience)
        self.metric = metric
        self.patience = patience
        saved = saved or {}
        self.value: float | None = saved.get("value")
        self.step: int | None = saved.get("step")
        self.since: int = int(saved.get("since", 0))

    def observe(self, at: int, evaluation: Mapping[str, float]) -> tuple[bool, bool]:
        """``(improved, stop)`` after the evaluation at step ``at``."""
        if self.metric not in evaluation:
            raise ValueError(
                f"best_metric {self.metric!r} is not among the evaluation's values {sorted(evaluation)}: "
                f"best_dir and patience follow it. Pass one of those as best_metric (eval_fn's keys take an "
                f"'eval_' prefix)."
            )
        value = evaluation[self.metric]
        if self.value is None or value < self.value:
            self.value, self.step, self.since = value, at, 0
            return True, False
        self.since += 1
        return False, self.patience is not None and self.since >= self.patience

    def state(self) -> dict:
        return {"value": self.value, "step": self.step, "since": self.since}

    def summary(self) -> dict | None:
        return None if self.value is None else {"step": self.step, "value": self.value}
