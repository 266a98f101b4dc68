"""The ``jaxlstm`` command, called in-process: runs, resumes, and every failure as one line.

What a user could lose is checked first: ``--overwrite`` deletes only what a
run wrote, ``--resume`` continues exactly or refuses, a failed start leaves
nothing behind.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess

import pytest

from jaxlstm.app.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("peer_promotion")]

SMALL = [
    "--seq-len",
    "16",
    "--batch-size",
    "4",
    "--hidden-size",
    "16",
    "--embed-dim",
    "8",
    "--eval-every",
    "3",
    "--save-every",
    "3",
    "--no-progress",
]


def cli(*args):
    return main(list(args))


@pytest.fixture
def text(tmp_path):
    t = tmp_path / "t.txt"
    t.write_text("to be or not to be, that is the question. " * 40, encoding="utf-8")
    return t


def one_line_error(capsys, *args, code=2):
    """Run a command that must fail: its exit code, and exactly one line on stderr (no traceback)."""
    assert cli(*args) == code
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_train_resume_generate(tmp_path, text, capsys):
    out = tmp_path / "run"
    common = ["--text", str(text), "--out", str(out), *SMALL]
    assert cli("train", "--steps", "6", *common) == 0
    for name in ("config.json", "metrics.jsonl", "loss.png", "sample.txt"):
        assert (out / name).exists(), name
    printed = capsys.readouterr().out
    assert "held-out" in printed and "bits/char" in printed and "sample:" in printed
    assert "--resume" in one_line_error(capsys, "train", "--steps", "6", *common)
    assert cli("train", "--steps", "9", "--resume", *common) == 0
    assert "lengthening the run from 6 to 9 steps" in capsys.readouterr().out
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 9
    assert cli("generate", "--checkpoint", str(out), "--prompt", "to be", "--length", "20") == 0
    sample = capsys.readouterr().out
    assert sample.startswith("to be") and len(sample.rstrip("\n")) >= 25
    # greedy decoding: --greedy, --temperature 0 and --top-k 1 agree, whatever the seed
    runs = []
    for extra in (["--greedy"], ["--temperature", "0", "--seed", "3"], ["--top-k", "1", "--seed", "5"]):
        assert cli("generate", "--checkpoint", str(out), "--prompt", "to", "--length", "15", *extra) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] == runs[2]
    assert cli("generate", "--checkpoint", str(out), "--length", "10", "--num-samples", "3", "--top-p", "0.9") == 0
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if line.startswith("--- sample")] == [
        f"--- sample {k} of 3 ---" for k in (1, 2, 3)
    ]


def test_input_errors(tmp_path, capsys):
    assert "not found" in one_line_error(
        capsys, "train", "--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r1")
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert "empty" in one_line_error(capsys, "train", "--text", str(empty), "--out", str(tmp_path / "r2"))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    assert "not UTF-8" in one_line_error(capsys, "train", "--text", str(latin), "--out", str(tmp_path / "r3"))
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 3)
    msg = one_line_error(capsys, "train", "--text", str(short), "--seq-len", "64", "--out", str(tmp_path / "r4"))
    assert "longer than the training text" in msg
    for r in ("r1", "r2", "r3", "r4"):  # a failed start leaves no run folder behind
        assert not (tmp_path / r).exists()
    assert "not found" in one_line_error(capsys, "generate", "--checkpoint", str(tmp_path / "nothing"))
    (tmp_path / "notarun").mkdir()
    assert "no config.json" in one_line_error(capsys, "generate", "--checkpoint", str(tmp_path / "notarun"))


@pytest.mark.parametrize(
    "args,match",
    [
        (["train", "--lr", "nan"], "--lr: must be a finite number"),
        (["train", "--lr", "inf"], "--lr: must be a finite number"),
        (["train", "--lr", "-1"], "--lr: must be positive"),
        (["train", "--steps", "0"], "--steps: must be positive"),
        (["train", "--batch-size", "two"], "--batch-size: expected an integer"),
        (["generate", "--checkpoint", "x", "--temperature", "nan"], "--temperature: must be a finite number"),
        (["demo", "--batch", "0"], "--batch: must be positive"),
        (["generate", "--checkpoint", "x", "--top-p", "1.5"], "--top-p: must be at most 1.0"),
        (["generate", "--checkpoint", "x", "--top-k", "0"], "--top-k: must be positive"),
        (["generate", "--checkpoint", "x", "--temperature", "-1"], "--temperature: must be at least 0"),
        (["demo", "--hidden-size", "-3"], "--hidden-size: must be positive"),
        (["train", "--resume", "--overwrite"], "give one of them"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, capsys, args, match):
    argv = args + (["--out", str(tmp_path / "r")] if args[0] == "train" else [])
    assert match in one_line_error(capsys, *argv)
    assert not (tmp_path / "r").exists()


def test_overwrite_removes_only_what_a_run_wrote(tmp_path, text, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my own work")
    (folder / "data").mkdir()
    (folder / "data" / "x.csv").write_text("1,2")
    # a folder that holds no run: --overwrite deletes nothing, the run goes beside the user's files
    assert cli("train", "--text", str(text), "--out", str(folder), "--steps", "3", "--overwrite", *SMALL) == 0
    assert (folder / "notes.txt").read_text() == "my own work" and (folder / "data" / "x.csv").exists()
    # a folder that holds a run and the user's files: the run's files are replaced, the user's stay
    assert cli("train", "--text", str(text), "--out", str(folder), "--steps", "3", "--overwrite", *SMALL) == 0
    assert (folder / "notes.txt").read_text() == "my own work" and (folder / "data" / "x.csv").exists()
    steps = [json.loads(x)["step"] for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(3) == 2  # one run's rows (a train row and an eval row at step 3), not two runs'
    capsys.readouterr()
    # "--out . --overwrite" in a working directory that holds no run deletes nothing
    cwd = os.getcwd()
    os.chdir(tmp_path / "mine" / "data")
    try:
        assert cli("train", "--text", str(text), "--out", ".", "--steps", "2", "--overwrite", *SMALL) == 0
    finally:
        os.chdir(cwd)
    assert (folder / "data" / "x.csv").read_text() == "1,2"


@pytest.mark.parametrize(
    "bad, words",
    [(["--text", "nope.txt"], "text file not found"), (["--seq-len", "30000"], "--seq-len 30000 is longer")],
    ids=["missing-text", "seq-len-longer-than-the-text"],
)
def test_overwrite_with_a_bad_option_removes_nothing(tmp_path, text, capsys, bad, words):
    """--overwrite used to remove the finished run, then fail on the option: both runs lost."""
    out = tmp_path / "run"
    assert cli("train", "--text", str(text), "--out", str(out), "--steps", "3", *SMALL) == 0
    files = lambda: {  # noqa: E731
        p.relative_to(out): (p.stat().st_mtime_ns, p.read_bytes())
        for p in out.rglob("*")
        if p.is_file() and p.name != ".jaxlstm.lock"  # the lock holds the pid of the process in the folder
    }
    before = files()
    args = ["train", "--text", str(text), "--out", str(out), "--steps", "3", "--overwrite", *SMALL, *bad]
    msg = one_line_error(capsys, *args)
    assert words in msg and "removed" not in capsys.readouterr().out
    assert files() == before


def test_cpu_devices_cannot_change_once_jax_runs_in_the_process(tmp_path, text, capsys):
    """In-process callers of main(): JAX already has its devices; asking for others is one line."""
    msg = one_line_error(
        capsys, "train", "--text", str(text), "--out", str(tmp_path / "r"), "--cpu-devices", "3", *SMALL
    )
    assert "process of its own" in msg
    assert not (tmp_path / "r").exists()


def test_a_new_run_never_replaces_files_named_like_a_runs(tmp_path, text, capsys, monkeypatch):
    """--text sample.txt --out . in the user's folder: the text was replaced by 400 generated characters
    and the user's metrics.jsonl row dropped."""
    (tmp_path / "sample.txt").write_text(text.read_text())
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
    monkeypatch.chdir(tmp_path)
    msg = one_line_error(capsys, "train", "--text", "sample.txt", "--out", ".", "--steps", "3", *SMALL)
    assert "named like a run's (metrics.jsonl, sample.txt)" in msg
    assert (tmp_path / "sample.txt").read_text() == text.read_text()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "mine": true}\n'
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("seed", ["4294967294", "4294967296", "9223372036854775807"])
def test_a_seed_jax_would_wrap_around_is_refused(tmp_path, text, capsys, seed):
    """--seed 4294967296 gave the run of --seed 0; 9223372036854775807 an OverflowError naming no option."""
    msg = one_line_error(capsys, "train", "--text", str(text), "--out", str(tmp_path / "r"), "--seed", seed, *SMALL)
    assert "--seed" in msg and "at most 4294967293" in msg


def test_foreign_config_is_never_deleted(tmp_path, text, capsys):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text('{"lr": 1}')
    msg = one_line_error(capsys, "train", "--text", str(text), "--out", str(folder), "--overwrite", *SMALL)
    assert "jaxlstm did not write" in msg
    assert (folder / "config.json").read_text() == '{"lr": 1}'


def test_resume_refuses_changes_and_lists_them(tmp_path, text, capsys):
    out = tmp_path / "run"
    assert cli("train", "--text", str(text), "--out", str(out), "--steps", "3", *SMALL) == 0
    capsys.readouterr()
    msg = one_line_error(
        capsys,
        "train",
        "--out",
        str(out),
        "--resume",
        "--hidden-size",
        "32",
        "--lr",
        "0.1",
        "--classic",
        "--batch-size",
        "8",
        "--layers",
        "2",
    )
    for flag in ("--hidden-size", "--lr", "--classic", "--batch-size", "--layers"):
        assert flag in msg
    other = tmp_path / "other.txt"
    other.write_text("something else entirely. " * 60)
    assert "is not the text this run was trained on" in one_line_error(
        capsys, "train", "--out", str(out), "--resume", "--text", str(other)
    )
    assert "already completed 3 steps" in one_line_error(capsys, "train", "--out", str(out), "--resume", "--steps", "2")


def test_resume_from_another_folder_with_a_relative_text_path(tmp_path, text, capsys):
    out = tmp_path / "run"
    cwd = os.getcwd()
    os.chdir(text.parent)
    try:
        assert cli("train", "--text", text.name, "--out", str(out), "--steps", "3", *SMALL) == 0
    finally:
        os.chdir(cwd)
    assert json.loads((out / "config.json").read_text())["text"] == str(text)  # stored absolute
    assert cli("train", "--out", str(out), "--resume", "--steps", "4") == 0
    moved = tmp_path / "moved.txt"
    text.rename(moved)
    capsys.readouterr()
    assert "is gone; pass --text" in one_line_error(capsys, "train", "--out", str(out), "--resume", "--steps", "5")
    assert (
        cli("train", "--out", str(out), "--resume", "--steps", "5", "--text", str(moved)) == 0
    )  # same bytes: accepted


def test_edited_config_and_damaged_files(tmp_path, text, capsys):
    out = tmp_path / "run"
    assert cli("train", "--text", str(text), "--out", str(out), "--steps", "3", *SMALL) == 0
    capsys.readouterr()
    good = (out / "config.json").read_text()
    for edit, match in (
        (lambda c: c.update(hidden_size="big"), "hidden_size must be a positive integer"),
        (lambda c: c.update(colour="red"), "unknown keys \\['colour'\\]"),
        (lambda c: c.pop("seq_len"), "missing keys \\['seq_len'\\]"),
        (lambda c: c.update(hidden_size=12), "config.json was edited: one of the fields its checkpoints"),
        # a run from before config.json carried its digest: the checkpoints' shapes still tell
        (lambda c: (c.update(hidden_size=12), c.pop("identity_sha256")), "written by another model"),
    ):
        cfg = json.loads(good)
        edit(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
        assert re.search(match, one_line_error(capsys, "generate", "--checkpoint", str(out)))
    (out / "config.json").write_text(good[:40])
    assert "cannot be read as JSON" in one_line_error(capsys, "generate", "--checkpoint", str(out))
    (out / "config.json").write_text(good)
    # a half-written last line in metrics.jsonl does not break resume, and is repaired
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    assert cli("train", "--out", str(out), "--resume", "--steps", "6") == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6


def test_out_naming_a_file_and_memory_guard(tmp_path, text, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert "is a file" in one_line_error(capsys, "train", "--text", str(text), "--out", str(f))
    msg = one_line_error(
        capsys,
        "train",
        "--text",
        str(text),
        "--out",
        str(tmp_path / "big"),
        "--batch-size",
        "3000000",
        "--seq-len",
        "128",
    )
    assert "lower --batch-size" in msg and "GiB" in msg
    assert not (tmp_path / "big").exists()


def _mount_tmpfs(path: pathlib.Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A real 1.5 MiB file system (tmpfs; needs root, as CI runs): writes beyond it fail with ENOSPC."""
    where = tmp_path / "disk"
    if not _mount_tmpfs(where, "size=1536k"):
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


# orbax leaves coroutines behind after a failed write ("Event loop is closed" when collected); the
# jaxlstm command silences them, an in-process call sees them as warnings
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_full_disk_is_one_line_and_keeps_earlier_checkpoints(small_disk, text, capsys):
    out = small_disk / "run"
    # about 0.85 MB per checkpoint (H = 128, with Adam's moments): the second one does not fit
    rc = cli(
        "train",
        "--text",
        str(text),
        "--out",
        str(out),
        "--steps",
        "20",
        "--save-every",
        "2",
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--hidden-size",
        "128",
        "--embed-dim",
        "8",
        "--eval-every",
        "100",
        "--no-progress",
    )
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0], err
    steps = sorted(int(d.name) for d in (out / "checkpoints").iterdir() if d.name.isdigit())
    assert steps and steps[-1] >= 2  # what was saved before the disk filled is there ...
    from jaxlstm.app import charlm

    with __import__("jax").enable_x64(False):
        charlm.load(out, log=lambda m: None)  # ... and intact


def test_read_only_folder_is_one_line(tmp_path, text, capsys):
    where = tmp_path / "ro"
    if not _mount_tmpfs(where, "size=1m,ro"):
        pytest.skip("cannot mount a read-only tmpfs here (not root)")
    try:
        msg = one_line_error(capsys, "train", "--text", str(text), "--out", str(where / "run"), *SMALL)
        assert "Read-only file system" in msg
        msg = one_line_error(capsys, "train", "--text", str(text), "--out", str(where), *SMALL)
        assert "Read-only file system" in msg
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_help_shows_every_option_with_a_line_and_version(capsys):
    import jaxlstm

    for command in ("train", "generate", "demo"):
        assert cli(command, "--help") == 0
        printed = capsys.readouterr().out
        options = [o for o in re.findall(r"^  (--[a-z-]+)", printed, re.M) if o != "--help"]
        assert options, printed
        for option in options:  # every option is followed by its help text on its line or the next
            block = printed.split(option, 1)[1].split("\n  --", 1)[0]
            assert len(block.split()) >= 3, (command, option, block)
    assert cli("--version") == 0
    assert capsys.readouterr().out.strip() == f"jaxlstm {jaxlstm.__version__}"


def test_train_options_no_progress_lines_best_and_patience(tmp_path, text, capsys):
    out = tmp_path / "run"
    args = ["--text", str(text), "--out", str(out), *SMALL, "--dropout", "0.2", "--recurrent-dropout", "0.1"]
    args += ["--weight-decay", "0.01", "--warmup", "2", "--log-every", "2", "--lr", "0.5", "--patience", "1"]
    assert cli("train", "--steps", "30", *args) == 0
    printed = capsys.readouterr().out
    # --no-progress: one plain line per logging interval, in bits per character, with the held-out figure
    lines = [x for x in printed.splitlines() if re.match(r"step \d+/30: train", x)]
    assert lines and all("bits/char" in x for x in lines)
    assert any("held-out" in x for x in lines[2:])
    config = json.loads((out / "config.json").read_text())
    assert (config["dropout_rate"], config["recurrent_dropout_rate"], config["weight_decay"]) == (0.2, 0.1, 0.01)
    assert (config["warmup_steps"], config["log_every"], config["patience"]) == (2, 2, 1)
    # the best evaluation is kept beside the latest checkpoints
    assert "best held-out:" in printed
    best_step = int(re.search(r"best held-out: [\d.]+ bits/char at step (\d+)", printed).group(1))
    assert sorted(int(p.name) for p in (out / "best").iterdir() if p.name.isdigit()) == [best_step]
    # patience 1: the run ends at the first evaluation that does not beat the best one (if any does not)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_bits_per_char"]) for r in rows if "eval_bits_per_char" in r]
    best, stop_at = float("inf"), None
    for step, value in evals:
        if value < best:
            best = value
        elif step < 30:
            stop_at = step
            break
    if stop_at is None:
        assert rows[-1]["step"] == 30 and "stopped early" not in printed
    else:
        assert evals[-1][0] == stop_at and f"stopped early at step {stop_at}" in printed
    assert min(v for _, v in evals) == pytest.approx(
        float(re.search(r"best held-out: ([\d.]+)", printed).group(1)), abs=5e-4
    )
    # these options define the run: --resume refuses a change
    msg = one_line_error(capsys, "train", "--resume", "--out", str(out), "--dropout", "0.3")
    assert "--dropout: the run has 0.2, the command line 0.3" in msg


@pytest.mark.parametrize("version", [1, 2])
def test_runs_of_earlier_format_versions_still_resume(tmp_path, text, capsys, version):
    """Runs written before an option existed resume with the value they were trained with (random windows,
    no carried state: their checkpoints hold none)."""
    out = tmp_path / "run"
    assert cli("train", "--steps", "3", "--text", str(text), "--out", str(out), *SMALL) == 0
    config = json.loads((out / "config.json").read_text())
    added = {1: ["dropout_rate", "recurrent_dropout_rate", "weight_decay", "warmup_steps", "log_every", "patience"]}
    for key in added.get(version, []) + ["streams", "input_dropout_rate", "identity_sha256"]:
        del config[key]
    config["format_version"] = version
    (out / "config.json").write_text(json.dumps(config))
    assert cli("train", "--steps", "6", "--resume", "--out", str(out), "--no-progress") == 0
    resumed = json.loads((out / "config.json").read_text())
    assert resumed["streams"] is False and resumed["input_dropout_rate"] == 0.0 and resumed["format_version"] == 3
    if version == 1:
        assert resumed["log_every"] == 10
    assert cli("generate", "--checkpoint", str(out), "--length", "5") == 0


def test_a_bad_xla_flag_leaves_nothing_that_blocks_the_corrected_command(tmp_path, text):
    """XLA's fatal error at start-up used to leave config.json and the lock: the corrected command then
    refused ("already holds a run"). JAX starts its devices now before the run folder is touched."""
    import sys

    out = tmp_path / "run"
    launcher = "import sys, jaxlstm_cli; sys.exit(jaxlstm_cli.main())"
    cmd = [sys.executable, "-c", launcher, "train", "--text", str(text), "--out", str(out), "--steps", "3", *SMALL]
    env = dict(os.environ)
    bad = subprocess.run(
        cmd, env=dict(env, XLA_FLAGS=env.get("XLA_FLAGS", "") + " --xla_garbage_flag=1"), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0
    assert not out.exists()
    good = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr[-2000:]


def test_text_that_is_not_a_regular_file_is_named_for_what_it_is(tmp_path, text, capsys):
    """--text /dev/null and a FIFO used to be called "a directory"."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path in ("/dev/null", str(fifo)):
        msg = one_line_error(capsys, "train", "--text", path, "--out", str(tmp_path / "r"), *SMALL)
        assert "is a device, a pipe or a socket" in msg and "directory" not in msg
    msg = one_line_error(capsys, "train", "--text", str(tmp_path), "--out", str(tmp_path / "r"), *SMALL)
    assert "is a directory" in msg
    assert not (tmp_path / "r").exists()


def test_an_empty_out_is_refused(tmp_path, text, capsys, monkeypatch):
    """--out '' used to train into the current folder without a word."""
    monkeypatch.chdir(tmp_path)
    msg = one_line_error(capsys, "train", "--text", str(text), "--out", "", *SMALL)
    assert "--out is empty" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_generate_reads_the_best_checkpoint_and_takes_out_as_the_run_folder(tmp_path, text, capsys):
    out = tmp_path / "run"
    assert cli("train", "--text", str(text), "--out", str(out), "--steps", "6", *SMALL) == 0
    best = sorted(int(p.name) for p in (out / "best").iterdir() if p.name.isdigit())
    assert len(best) == 1
    capsys.readouterr()
    assert cli("generate", "--out", str(out), "--best", "--length", "5", "--greedy") == 0
    got = capsys.readouterr()
    assert f"using the best checkpoint, from step {best[0]}" in got.err
    # the same text as the model restored from best/ by hand
    from jaxlstm.app import charlm

    model, params, cfg = charlm.load(out, log=lambda m: None, best=True)
    assert got.out.strip() == charlm.sample(model, params, cfg.vocab, "", 5, 0.0, 0)[0].strip()


def test_without_a_terminal_train_writes_lines_not_bar_frames(tmp_path, text, capsys):
    """Where stderr is not a terminal (a log file, a scheduler), the bar's frames piled up; now plain lines."""
    args = [a for a in SMALL if a != "--no-progress"]
    assert (
        cli("train", "--text", str(text), "--out", str(tmp_path / "r"), "--steps", "6", "--log-every", "2", *args) == 0
    )
    got = capsys.readouterr()
    assert "\r" not in got.err and "\r" not in got.out
    assert "step 2/6: train" in got.out and "step 3: held-out" in got.out


def test_every_checkpoint_damaged_is_a_few_lines_not_a_traceback_wall(tmp_path, text):
    """generate and train --resume when every checkpoint is damaged: one note per checkpoint and one error
    line (5,000-7,000 lines of asyncio/orbax tracebacks from orbax's threads were reported)."""
    import sys

    out = tmp_path / "run"
    assert cli("train", "--text", str(text), "--out", str(out), "--steps", "6", *SMALL) == 0
    for step in (p for p in (out / "checkpoints").iterdir() if p.name.isdigit()):
        for f in step.rglob("*"):  # the array data (not the metadata): orbax reads the metadata, then fails
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(b"garbage" * 10)
    launcher = "import sys, jaxlstm_cli; sys.exit(jaxlstm_cli.main())"
    for args in (["generate", "--checkpoint", str(out), "--length", "5"], ["train", "--out", str(out), "--resume"]):
        run = subprocess.run([sys.executable, "-c", launcher, *args], capture_output=True, text=True, timeout=300)
        assert run.returncode == 2, run.stderr[-2000:]
        lines = [x for x in run.stderr.splitlines() if x.strip()]
        assert len(lines) <= 3 and "Traceback" not in run.stderr, run.stderr[-3000:]
        assert "no intact checkpoint" in lines[-1]


@pytest.mark.parametrize("field, value", [("vocab", None), ("embed_dim", 16)], ids=["vocab", "embed_dim"])
def test_a_hand_edited_field_the_checkpoints_were_trained_with_is_named(tmp_path, text, capsys, field, value):
    """An edited vocab was used silently (greedy output changed); an edited embed_dim made --resume call the
    run's own checkpoint "written by another model" and advise --overwrite."""
    out = tmp_path / "run"
    assert cli("train", "--text", str(text), "--out", str(out), "--steps", "3", *SMALL) == 0
    data = json.loads((out / "config.json").read_text())
    data[field] = data["vocab"][::-1] if field == "vocab" else value  # the same characters, other ids
    (out / "config.json").write_text(json.dumps(data))
    capsys.readouterr()
    for args in (["generate", "--checkpoint", str(out), "--length", "5"], ["train", "--out", str(out), "--resume"]):
        msg = one_line_error(capsys, *args)
        assert "was edited" in msg and "another model" not in msg and "--overwrite" not in msg, msg


def test_train_keeps_freed_memory_unless_told_otherwise(tmp_path, text, monkeypatch):
    """``--allocator reuse`` (the default) calls ``training.reuse_host_memory`` before training; ``system`` does not."""
    import jaxlstm.training

    calls = []
    monkeypatch.setattr(jaxlstm.training, "reuse_host_memory", lambda: calls.append(1) or True)
    common = ["--text", str(text), "--steps", "2", *SMALL]
    assert cli("train", "--out", str(tmp_path / "a"), "--allocator", "system", *common) == 0
    assert calls == []
    assert cli("train", "--out", str(tmp_path / "b"), *common) == 0
    assert calls == [1]
