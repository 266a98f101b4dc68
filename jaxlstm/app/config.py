"""A run's ``config.json``: everything that defines a run, its checks, and what ``--resume`` may change."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib

from .errors import RunError

FORMAT = "jaxlstm-charlm"
#: The largest ``--seed``: JAX's keys take 32-bit seeds, and the run uses ``seed``, ``seed + 1`` and ``seed + 2``
#: (a larger one would wrap around and repeat the run of a smaller one).
MAX_SEED = 2**32 - 3


FORMAT_VERSION = 3


#: Fields added in format version 2, with the values that reproduce a version-1 run.
ADDED_IN_2 = {
    "dropout_rate": 0.0,
    "recurrent_dropout_rate": 0.0,
    "weight_decay": 0.0,
    "warmup_steps": None,
    "log_every": 10,
    "patience": 0,
}


#: Fields added in format version 3, with the values that reproduce a version-1 or -2 run.
ADDED_IN_3 = {"streams": False, "input_dropout_rate": 0.0}


@dataclasses.dataclass
class Config:
    """Everything that defines a run. The fields in :data:`IDENTITY` may not change on ``--resume``."""

    embed_dim: int = 64
    hidden_size: int = 384
    num_layers: int = 1
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 3000
    learning_rate: float = 4e-3
    seed: int = 0
    eval_every: int = 400
    save_every: int = 400
    output_transform: bool = True
    text: str | None = None  # absolute path of the text, None: the embedded corpus
    text_sha256: str = ""
    vocab: str = ""
    schedule_steps: int = 0  # the steps the learning-rate schedule was built for (0: ``steps``)
    dropout_rate: float = 0.3
    recurrent_dropout_rate: float = 0.0
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # None: 5% of the schedule
    log_every: int = 100
    patience: int = 0  # evaluations without a better held-out figure before stopping (0: never)
    streams: bool = False  # contiguous streams with the state carried between batches (False: random windows)
    input_dropout_rate: float = 0.1


#: Fields that define the trained function and its data; ``--resume`` refuses to change them.
IDENTITY = (
    "embed_dim",
    "hidden_size",
    "num_layers",
    "seq_len",
    "batch_size",
    "learning_rate",
    "seed",
    "output_transform",
    "dropout_rate",
    "recurrent_dropout_rate",
    "weight_decay",
    "warmup_steps",
    "streams",
    "input_dropout_rate",
)


#: Command-line names of the fields, for messages.
FLAGS = {
    "embed_dim": "--embed-dim",
    "hidden_size": "--hidden-size",
    "num_layers": "--layers",
    "seq_len": "--seq-len",
    "batch_size": "--batch-size",
    "steps": "--steps",
    "learning_rate": "--lr",
    "seed": "--seed",
    "eval_every": "--eval-every",
    "save_every": "--save-every",
    "output_transform": "--classic",
    "text": "--text",
    "dropout_rate": "--dropout",
    "recurrent_dropout_rate": "--recurrent-dropout",
    "weight_decay": "--weight-decay",
    "warmup_steps": "--warmup",
    "log_every": "--log-every",
    "patience": "--patience",
    "streams": "--streams",
    "input_dropout_rate": "--input-dropout",
}


POSITIVE_INTS = (
    "embed_dim",
    "hidden_size",
    "num_layers",
    "seq_len",
    "batch_size",
    "steps",
    "eval_every",
    "save_every",
    "log_every",
)


def check_config(cfg: Config, source: str) -> Config:
    """Types and ranges of every field; ``source`` names where the values came from (for the message)."""
    problems = []
    for name in POSITIVE_INTS:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            problems.append(f"{name} must be a positive integer, not {v!r}")
    lr = cfg.learning_rate
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        problems.append(f"learning_rate must be a finite positive number, not {lr!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed <= MAX_SEED:
        problems.append(f"seed must be an integer in [0, {MAX_SEED}], not {cfg.seed!r}")
    for name in ("output_transform", "streams"):
        if not isinstance(getattr(cfg, name), bool):
            problems.append(f"{name} must be true or false, not {getattr(cfg, name)!r}")
    if cfg.text is not None and not isinstance(cfg.text, str):
        problems.append(f"text must be a path or null, not {cfg.text!r}")
    for name in ("text_sha256", "vocab"):
        if not isinstance(getattr(cfg, name), str):
            problems.append(f"{name} must be a string")
    for name in ("schedule_steps", "patience"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            problems.append(f"{name} must be a non-negative integer, not {v!r}")
    w = cfg.warmup_steps
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
        problems.append(f"warmup_steps must be a non-negative integer or null, not {w!r}")
    for name in ("dropout_rate", "recurrent_dropout_rate", "input_dropout_rate"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            problems.append(f"{name} must lie in [0, 1), not {v!r}")
    wd = cfg.weight_decay
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
        problems.append(f"weight_decay must be a finite number >= 0, not {wd!r}")
    if problems:
        raise RunError(f"{source}: " + "; ".join(problems) + ".")
    return cfg


#: What a run's checkpoints depend on: the fields ``--resume`` may not change, the vocabulary and the text.
TRAINED_WITH = IDENTITY + ("vocab", "text_sha256")


def identity_digest(cfg: Config) -> str:
    """SHA-256 of :data:`TRAINED_WITH`: ``config.json`` carries it, so a hand edit of those fields is caught."""
    values = {k: getattr(cfg, k) for k in TRAINED_WITH}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def config_text(cfg: Config) -> str:
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, **dataclasses.asdict(cfg)}
    return json.dumps({**body, "identity_sha256": identity_digest(cfg)}, indent=1)


def read_json_config(path: pathlib.Path) -> dict | None:
    """The parsed ``config.json`` of a jaxlstm run, ``None`` if absent; RunError if it is not one of ours."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(
            f"{path} cannot be read as JSON ({e}); restore it, or start a new run in another --out."
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RunError(
            f"{path.parent} holds a config.json that jaxlstm did not write; choose another --out "
            "(jaxlstm never deletes files it did not write)."
        )
    return data


def read_config(run_dir: pathlib.Path) -> Config:
    run_dir = pathlib.Path(run_dir)
    path = run_dir / "config.json"
    if not run_dir.exists():
        raise RunError(f"run folder not found: {run_dir}.")
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is a file, not a run folder. Point at the --out of a training run.")
    data = read_json_config(path)
    if data is None:
        raise RunError(f"{run_dir} is not a jaxlstm run folder (no config.json). Point at the --out of a training run.")
    version = data.get("format_version")
    if version not in (1, 2, FORMAT_VERSION):
        raise RunError(f"{path} has format version {version!r}; this jaxlstm reads 1 to {FORMAT_VERSION}.")
    fields = {k: v for k, v in data.items() if k not in ("format", "format_version", "identity_sha256")}
    # a run from before these options: they keep the values it was trained with
    if version == 1:
        fields = {**ADDED_IN_2, **fields}
    if version in (1, 2):
        fields = {**ADDED_IN_3, **fields}
    known = {f.name for f in dataclasses.fields(Config)}
    unknown, missing = sorted(set(fields) - known), sorted(known - set(fields))
    if unknown or missing:
        what = "; ".join(x for x in (unknown and f"unknown keys {unknown}", missing and f"missing keys {missing}") if x)
        raise RunError(f"{path} was edited and no longer describes a run ({what}).")
    cfg = check_config(Config(**fields), f"{path} (edited?)")
    stored = data.get("identity_sha256")  # absent in runs written before it was stored
    if stored is not None and stored != identity_digest(cfg):
        raise RunError(
            f"{path} was edited: one of the fields its checkpoints were trained with ({', '.join(TRAINED_WITH)}) "
            "no longer holds the run's value. Restore the file (only eval_every, save_every, log_every, patience "
            "and steps may change, through the command line), or start a new run with another --out."
        )
    return cfg


def new_config(options: dict) -> Config:
    unknown = set(options) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise RunError(f"unknown options {sorted(unknown)}.")
    return check_config(Config(**options), "options")


def resume_config(saved: Config, options: dict, completed: int, log) -> Config:
    """The saved config, with the options a resume may change; refuses changes to what defines the run."""
    diffs = []
    for name in IDENTITY:
        if name in options and options[name] != getattr(saved, name):
            flag = FLAGS[name]
            if name == "output_transform":
                diffs.append(f"{flag}: the run uses the {'output-map' if saved.output_transform else 'classic'} cell")
            elif name == "streams":
                diffs.append(f"{flag}: the run reads {'streams' if saved.streams else 'random windows'}")
            else:
                diffs.append(f"{flag}: the run has {getattr(saved, name)!r}, the command line {options[name]!r}")
    if diffs:
        raise RunError(
            "--resume continues a run exactly, and these options differ from it: "
            + "; ".join(diffs)
            + ". Drop them to continue, or start a new run with another --out."
        )
    changeable = ("eval_every", "save_every", "log_every", "patience")
    cfg = dataclasses.replace(saved, **{k: options[k] for k in changeable if k in options})
    schedule = saved.schedule_steps or saved.steps
    if "steps" in options and options["steps"] != saved.steps:
        steps = options["steps"]
        if steps < completed:
            raise RunError(f"--steps {steps}: the run has already completed {completed} steps.")
        if steps > schedule:
            log(
                f"lengthening the run from {saved.steps} to {steps} steps: the learning-rate schedule keeps its "
                f"{schedule}-step shape, so steps past {schedule} run at its final rate "
                f"({0.1 * saved.learning_rate:.3g})"
            )
        cfg = dataclasses.replace(cfg, steps=steps)
    return dataclasses.replace(cfg, schedule_steps=schedule)
