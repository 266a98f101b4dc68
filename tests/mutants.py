"""Each guarantee the README states, its mechanism removed, and the test that must then fail.

A mutant is one small edit to the library that removes (or breaks) the
mechanism behind a guarantee. This script applies each mutant to a copy of the
repository, runs the tests named for that guarantee, and reports whether they
failed ("killed", as they should) or passed ("survived": the guarantee is not
tested). The repository itself is never edited.

    python tests/mutants.py                 # every mutant, table in tests/results/mutants.md
    python tests/mutants.py --only digest   # the mutants whose name contains "digest"
    python tests/mutants.py --list

A survivor is a missing test: write the test, then run its mutant again.
A mutant counts as killed only when the same tests pass on the unmutated copy.
Exit status: 0 when every mutant was killed, 1 when one survived, 2 when a
mutant no longer applies (its code moved: update the mutant) or its tests fail
without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    guarantee: str  # in the README's words
    path: str  # the file edited, relative to the repository
    old: str  # the code of the mechanism: must occur exactly once
    new: str  # the code without it
    tests: tuple[str, ...]  # pytest node ids or -k expressions ("file::test" or "file -k expr")


MUTANTS = (
    Mutant(
        "digest",
        "each checkpoint carries a SHA-256 of its arrays; a damaged one is never restored",
        "jaxlstm/_train/checkpoints.py",
        'meta.get("sha256") != _digest(tree, meta.get("extra"))',
        'not meta.get("sha256")',
        ("tests/test_training.py::test_a_checkpoint_whose_values_changed_but_still_read_is_refused_by_its_digest",),
    ),
    Mutant(
        "fallback",
        "a damaged newest checkpoint falls back to the newest intact one",
        "jaxlstm/_train/checkpoints.py",
        '                    on_fallback(f"checkpoint {s} is damaged ({e}); trying an earlier one")\n'
        "                continue",
        '                    on_fallback(f"checkpoint {s} is damaged ({e}); trying an earlier one")\n'
        "                raise CheckpointError(str(e))",
        ("tests/test_training.py::test_damaged_checkpoints_are_skipped_and_reported",),
    ),
    Mutant(
        "finite-save",
        "no checkpoint ever holds a NaN",
        "jaxlstm/_train/checkpoints.py",
        "        if not _all_finite(tree):\n            raise ValueError(",
        "        if False:\n            raise ValueError(",
        ("tests/test_training.py::test_checkpointer_refuses_non_finite_values",),
    ),
    Mutant(
        "nan-guard",
        "a non-finite update is not applied; the state before it is saved",
        "jaxlstm/_train/steps.py",
        "jnp.where(ok, n, o)",
        "n",
        ("tests/test_training.py -k nan or finite or non_finite",),
    ),
    Mutant(
        "resume-carry",
        "exact resume: params, optimizer state, step, data position, rng and carried state",
        "jaxlstm/_train/loop.py",
        "self.state, self.rng, self.carry = from_snapshot(self.state, snap, self.carry)",
        "self.state, self.rng, _ = from_snapshot(self.state, snap, self.carry)",
        ("tests/test_training.py -k resume or carry or stream",),
    ),
    Mutant(
        "metrics-cut",
        "rows past the checkpoint are dropped on resume; metrics.jsonl equals an uninterrupted run's",
        "jaxlstm/_train/records.py",
        "def read_metrics(path, upto: int | None = None) -> list:",
        "def read_metrics(path, upto: int | None = None, _cut: None = None) -> list:\n    upto = None",
        ("tests/test_training.py::test_metrics_are_cut_back_and_a_missed_evaluation_is_redone",),
    ),
    Mutant(
        "padding",
        "padding (t >= L) never reaches values: the state is held and the outputs are zero",
        "jaxlstm/_cell.py",
        "held = LSTMState(jnp.where(valid, new.cell, old.cell), jnp.where(valid, new.hidden, old.hidden))",
        "held = LSTMState(new.cell, jnp.where(valid, new.hidden, old.hidden))",
        ("tests/test_layer.py::test_lstm_matches_numpy_reference", "tests/test_layer.py -k lengths_zero"),
    ),
    Mutant(
        "padding-grad",
        "padding never reaches gradients (the hand-written backward pass)",
        "jaxlstm/_bptt.py",
        "d_pre = jnp.where(keep, d_pre, jnp.zeros_like(d_pre))",
        "d_pre = d_pre",
        ("tests/test_bptt.py::test_fused_matches_autodiff_float64",),
    ),
    Mutant(
        "output-map",
        "the output gate applies the learned map tanh(W_o c + b_o) to the new cell state",
        "jaxlstm/_gates.py",
        'return cell_output(params, cell) * jax.nn.sigmoid(_pre_activation(params, hidden_prev, x, "f3"))',
        'return jnp.tanh(cell) * jax.nn.sigmoid(_pre_activation(params, hidden_prev, x, "f3"))',
        ("tests/test_gates.py::test_gate_functions_match_formulas",),
    ),
    Mutant(
        "float32-accumulation",
        "mixed precision: half-precision matmuls accumulate in float32",
        "jaxlstm/_precision.py",
        "return jnp.matmul(a.astype(w.dtype), w, preferred_element_type=acc)",
        "return jnp.matmul(a.astype(w.dtype), w).astype(acc)",
        ("tests/test_precision.py -k accumulate",),
    ),
    Mutant(
        "float32-state",
        "mixed precision: the cell and hidden state stay float32 with half-precision compute",
        "jaxlstm/_precision.py",
        "return jnp.dtype(jnp.float32) if dtype in HALF else dtype",
        "return dtype",
        ("tests/test_precision.py::test_half_precision_state_dtype_and_its_check",),
    ),
    Mutant(
        "dropout-scale",
        "inverted dropout: nothing changes at evaluation, the expectation is kept in training",
        "jaxlstm/_stack.py",
        "jnp.asarray(1.0 / (1.0 - rate), dtype)",
        "jnp.asarray(1.0, dtype)",
        ("tests/test_stack.py -k dropout",),
    ),
    Mutant(
        "torch-gate-order",
        "weight exchange with PyTorch nn.LSTM is exact (gate order i f g o)",
        "jaxlstm/interop.py",
        'TORCH_ORDER = ("f2", "f1", "i", "f3")',
        'TORCH_ORDER = ("f1", "f2", "i", "f3")',
        ("tests/test_interop.py",),
    ),
    Mutant(
        "overwrite-only-run-files",
        "--overwrite removes only the files a run writes; the user's own files, always",
        "jaxlstm/app/runfolder.py",
        "    for name in RUN_FILES:\n        p = out / name",
        "    for name in RUN_FILES + ('notes.txt',):\n        p = out / name",
        ("tests/integration/test_cli.py::test_overwrite_removes_only_what_a_run_wrote",),
    ),
    Mutant(
        "config-digest",
        "an edit of a config.json field the checkpoints were trained with is caught",
        "jaxlstm/app/config.py",
        "if stored is not None and stored != identity_digest(cfg):",
        "if False:",
        ("tests/integration/test_cli.py -k hand_edited or edited_config",),
    ),
    Mutant(
        "lock",
        "a second jaxlstm train on the same folder is refused (a lock)",
        "jaxlstm/app/runfolder.py",
        "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
        "pass",
        ("tests/integration/test_train_faults.py -k lock or second or another",),
    ),
    Mutant(
        "symbolic-layout",
        "exports over a symbolic batch: a size-dependent layout takes the path that serves every size",
        "jaxlstm/_feature_major.py",
        "        and static(xs.shape[1])  # a symbolic batch: the row-major scan, which serves every size\n",
        "",
        ("tests/test_export.py::test_the_layout_choice_takes_a_valid_path_for_a_symbolic_batch",),
    ),
    Mutant(
        "portable-reverse",
        "ONNX: a backward pass converts (inside portable(), a forward scan over the flipped sequence)",
        "jaxlstm/_layer.py",
        "flip = bool(reverse) and _PORTABLE.get()",
        "flip = False",
        ("tests/test_onnx.py -k backwards",),
    ),
    Mutant(
        "stepper-carries-state",
        "streaming: the state is carried from one call to the next",
        "jaxlstm/_streaming.py",
        "self.state, y = self._step(self.state, x)",
        "_, y = self._step(jax.tree.map(jnp.array, self._first), x)",
        ("tests/test_streaming.py",),
    ),
    Mutant(
        "outer-sum",
        "a batch split over devices needs no all-gather (weight gradients summed over leading axes)",
        "jaxlstm/_bptt.py",
        "    lead = tuple(range(a.ndim - 1))\n"
        "    return jax.lax.dot_general(a, b, ((lead, lead), ((), ())), out_sharding=_vma.outer_sharding(a, b))",
        "    return a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1])",
        ("tests/integration/test_shard_map_devices.py",),
    ),
    Mutant(
        "onnx-lstm-gate-order",
        "a classic-cell run exported as ONNX's LSTM operator computes what the model computes (gates i, o, f, c)",
        "jaxlstm/app/export.py",
        "    order = [2, 3, 0, 1]  # ONNX i, o, f, c = jaxlstm f2, f3, f1, i",
        "    order = [0, 3, 2, 1]",
        ("tests/test_onnx.py -k lstm_operator",),
    ),
    Mutant(
        "host-memory",
        "jaxlstm train keeps freed memory for the next step (no page faults of the working buffers every step)",
        "jaxlstm/_train/host_memory.py",
        "SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1))",
        "SETTINGS = ((_M_TRIM_THRESHOLD, 2**31 - 1),)",
        ("tests/test_host_memory.py",),
    ),
)


def _copy_repo(dest: pathlib.Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\n")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _pytest_args(spec: str) -> list[str]:
    target, _, expr = spec.partition(" -k ")
    return [target] + (["-k", expr] if expr else [])


def run(mutant: Mutant, timeout: float) -> tuple[str, float, str]:
    """``(verdict, seconds, detail)``: killed, survived, timeout, broken (the tests fail unmutated too) or stale."""
    with tempfile.TemporaryDirectory(prefix="jaxlstm-mutant-") as tmp:
        copy = pathlib.Path(tmp)
        _copy_repo(copy)
        path = copy / mutant.path
        text = path.read_text()
        if text.count(mutant.old) != 1:
            return "stale", 0.0, f"the mechanism's code occurs {text.count(mutant.old)} times in {mutant.path}"
        path.write_text(text.replace(mutant.old, mutant.new))
        env = dict(os.environ, PYTHONPATH=str(copy), JAX_PLATFORMS="cpu")
        start = time.perf_counter()
        verdicts = []
        for spec in mutant.tests:
            cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *_pytest_args(spec)]
            # the copy's package is the one imported (checked, so an installed copy cannot mask a mutant)
            check = subprocess.run(
                [sys.executable, "-c", "import jaxlstm; print(jaxlstm.__file__)"],
                cwd=copy,
                env=env,
                capture_output=True,
                text=True,
            )
            if not check.stdout.strip().startswith(str(copy)):
                return "stale", 0.0, f"the copy's jaxlstm was not imported ({check.stdout.strip()})"
            try:
                proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                verdicts.append(("timeout", spec))
                continue
            if proc.returncode == 5:
                return "stale", time.perf_counter() - start, f"no test matched {spec}"
            verdicts.append(("killed" if proc.returncode else "survived", spec))
        killed = [spec for v, spec in verdicts if v == "killed"]
        if killed:
            # the control: the same tests pass on the code as it is, so it is the mutant that failed them
            path.write_text(text)
            for spec in killed:
                cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *_pytest_args(spec)]
                proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
                if proc.returncode:
                    return "broken", time.perf_counter() - start, f"{spec} fails without the mutant too"
            return "killed", time.perf_counter() - start, "failed: " + ", ".join(killed)
        seconds = time.perf_counter() - start
        if any(v == "timeout" for v, _ in verdicts):
            return "timeout", seconds, "the tests ran past the limit"
        return "survived", seconds, "every named test passed with the mechanism removed"


def _cpu() -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from timing import cpu_model  # the benchmarks' own: one way of naming the CPU

    return cpu_model()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test command (default 900)")
    parser.add_argument("--out", default=str(ROOT / "tests" / "results" / "mutants.md"))
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:26} {m.guarantee}\n{'':26} {'; '.join(m.tests)}")
        return 0
    rows, worst = [], 0
    for m in chosen:
        verdict, seconds, detail = run(m, args.timeout)
        print(f"{m.name:26} {verdict:9} {seconds:6.1f} s  {detail}", flush=True)
        rows.append(f"| {m.guarantee} | `{m.name}` ({m.path}) | {'<br>'.join(m.tests)} | {verdict} |")
        worst = max(worst, {"killed": 0, "survived": 1, "timeout": 1, "broken": 2, "stale": 2}[verdict])
    table = [
        "# Guarantees, their mechanisms removed, and the tests that fail",
        "",
        f"`python tests/mutants.py` on {_cpu()}, {time.strftime('%Y-%m-%d')}.",
        "",
        "| guarantee | mutant (mechanism removed) | tests run | verdict |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    if not args.only:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(table))
        print(f"table: {out}")
    return worst


if __name__ == "__main__":
    sys.exit(main())
