"""``jaxlstm export``: a trained run as ONNX (run in onnxruntime in a process without JAX) and as a
StableHLO artifact, for any batch and length, continuing streams through the state it returns."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlstm.app.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("peer_promotion")]

SMALL = ["--seq-len", "16", "--batch-size", "4", "--hidden-size", "16", "--embed-dim", "8", "--layers", "2"]
SMALL += ["--eval-every", "3", "--save-every", "3", "--no-progress", "--steps", "3"]


def _trained(tmp_path_factory, name: str, *extra: str):
    d = tmp_path_factory.mktemp(name)
    text = d / "t.txt"
    text.write_text("to be or not to be, that is the question. " * 40, encoding="utf-8")
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):  # as peer_promotion
        assert main(["train", "--text", str(text), "--out", str(d / "run"), *extra, *SMALL]) == 0
    return d / "run"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _trained(tmp_path_factory, "export")


@pytest.fixture(scope="module")
def classic_run(tmp_path_factory):
    return _trained(tmp_path_factory, "export_classic", "--classic")


def _reference(run_dir, tokens, cell, hidden):
    """The model as JAX runs it, through the library's own loader (not the exported program)."""
    from jaxlstm.app.charlm import load

    model, params, cfg = load(run_dir, lambda m: None)
    states = tuple(jaxlstm_state(cell[k], hidden[k]) for k in range(cell.shape[0]))
    with jax.enable_x64(False):
        logits, finals = model.apply(
            {"params": params}, jnp.asarray(tokens), states, deterministic=True, return_state=True
        )
    return cfg, np.asarray(logits), np.stack([f.cell for f in finals]), np.stack([f.hidden for f in finals])


def _vocab_size(run_dir) -> int:
    return len(json.loads((run_dir / "config.json").read_text())["vocab"])


def jaxlstm_state(c, h):
    import jaxlstm

    return jaxlstm.LSTMState(jnp.asarray(c), jnp.asarray(h))


ONNX_WITHOUT_JAX = r"""
import json, sys
sys.modules["jax"] = None  # importing JAX would fail: the model runs without it
import numpy as np, onnx, onnxruntime as ort
path, inputs = sys.argv[1], np.load(sys.argv[2])
vocab = json.loads({p.key: p.value for p in onnx.load(path).metadata_props}["vocabulary"])
options = ort.SessionOptions(); options.log_severity_level = 3
session = ort.InferenceSession(path, options)
names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
feeds = {"tokens": inputs["tokens"], "cell": inputs["cell"], "hidden": inputs["hidden"]}
logits, cell, hidden = session.run(None, feeds)
# one character at a time, the state fed back: the same as the whole sequence at once
c, h, steps = inputs["cell"], inputs["hidden"], []
for t in range(inputs["tokens"].shape[1]):
    out, c, h = session.run(None, {"tokens": inputs["tokens"][:, t : t + 1], "cell": c, "hidden": h})
    steps.append(out)
np.savez(sys.argv[3], logits=logits, cell=cell, hidden=hidden, stepped=np.concatenate(steps, 1))
print(json.dumps({"vocab": vocab, "names": names}))
"""


@pytest.mark.parametrize("fmt", ["onnx", "onnx-lstm"])
def test_onnx_runs_in_onnxruntime_without_jax(fmt, request, tmp_path, capsys):
    """``onnx``: the output-map run through jax2onnx; ``onnx-lstm``: a classic-cell run as ONNX's LSTM operator."""
    pytest.importorskip(
        "jax2onnx" if fmt == "onnx" else "onnx", reason="the export extra: pip install 'jaxlstm[export]'"
    )
    run = request.getfixturevalue("run" if fmt == "onnx" else "classic_run")
    capsys.readouterr()  # what training the run printed
    model_path = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(run), "--out", str(model_path), "--format", fmt]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {model_path}"
    cfg = None
    for b, t in ((1, 1), (3, 9)):
        rng = np.random.default_rng(b)
        tokens = rng.integers(0, _vocab_size(run), (b, t)).astype(np.int32)
        cell = (0.1 * rng.standard_normal((2, b, 16))).astype(np.float32)
        hidden = (0.1 * rng.standard_normal((2, b, 16))).astype(np.float32)
        np.savez(tmp_path / "in.npz", tokens=tokens, cell=cell, hidden=hidden)
        proc = subprocess.run(
            [sys.executable, "-c", ONNX_WITHOUT_JAX, str(model_path), str(tmp_path / "in.npz"), str(tmp_path / "o")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        got = np.load(tmp_path / "o.npz")
        cfg, logits, c, h = _reference(run, tokens, cell, hidden)
        assert info["names"] == [["tokens", "cell", "hidden"], ["logits", "cell_out", "hidden_out"]]
        assert "".join(info["vocab"]) == cfg.vocab
        np.testing.assert_allclose(got["logits"], logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["cell"], c, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["hidden"], h, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["stepped"], logits, rtol=1e-5, atol=1e-5)
    assert cfg is not None and got["logits"].shape == (3, 9, len(cfg.vocab))


def test_stablehlo_artifact_for_any_batch_and_length(run, tmp_path, capsys):
    from jax import export

    out = tmp_path / "model.jaxexport"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "model.jaxexport.json").read_text())
    exported = export.deserialize(bytearray(out.read_bytes()))
    assert [str(a.shape) for a in exported.in_avals] == ["(B, T)", "(2, B, 16)", "(2, B, 16)"]
    for b, t in ((1, 1), (5, 12)):
        rng = np.random.default_rng(b)
        tokens = rng.integers(0, _vocab_size(run), (b, t)).astype(np.int32)
        cell = (0.1 * rng.standard_normal((2, b, 16))).astype(np.float32)
        hidden = (0.1 * rng.standard_normal((2, b, 16))).astype(np.float32)
        with jax.enable_x64(False):
            got = exported.call(tokens, cell, hidden)
        cfg, *want = _reference(run, tokens, cell, hidden)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert "".join(json.loads(meta["vocabulary"])) == cfg.vocab


def test_export_mistakes_are_one_line(run, tmp_path, capsys):
    for args, words in (
        (["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "m.onnx")], "run folder not found"),
        (["--checkpoint", str(run), "--out", str(tmp_path)], "is a folder; give a file name"),
        (["--checkpoint", str(run), "--out", str(tmp_path / "no" / "m.onnx")], "does not exist"),
        (["--checkpoint", str(run), "--out", str(tmp_path / "m.onnx"), "--format", "onnx-lstm"], "use --format onnx"),
    ):
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())  # nothing written
