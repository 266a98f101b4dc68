"""ONNX: models holding jaxlstm layers convert with jax2onnx (dynamic batch and time, both directions,
lengths and masks) and onnxruntime reproduces JAX to 1e-5."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlstm
import jaxlstm.linen as jl
import jaxlstm.nnx as jn

pytest.importorskip("jax2onnx", reason="the export extra: pip install 'jaxlstm[export]'")
ort = pytest.importorskip("onnxruntime")

I, H = 3, 6
SHAPES = ((1, 1), (2, 7), (17, 4))


def _inputs(b, t, seed=0):
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((b, t, I)).astype(np.float32)
    lengths = rng.integers(0, t + 1, b).astype(np.int32)
    mask = (rng.random((b, t)) < 0.7) & (np.arange(t)[None] < lengths[:, None])
    return xs, lengths, mask


def _convert_and_compare(fn, names):
    """Convert ``fn`` with inputs named ``names`` (of xs, lengths, mask), run it in onnxruntime at each
    shape, compare with JAX."""
    from jax2onnx import to_onnx

    specs = {
        "xs": jax.ShapeDtypeStruct(("B", "T", I), jnp.float32),
        "lengths": jax.ShapeDtypeStruct(("B",), jnp.int32),
        "mask": jax.ShapeDtypeStruct(("B", "T"), jnp.bool_),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with jaxlstm.portable():
            proto = to_onnx(fn, [specs[n] for n in names], model_name="m", input_names=list(names))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options)
    for b, t in SHAPES:
        values = dict(zip(("xs", "lengths", "mask"), _inputs(b, t)))
        args = [values[n] for n in names]
        got = session.run(None, dict(zip(names, args)))
        want = jax.tree.leaves(fn(*args))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=f"B={b}, T={t}")


@pytest.mark.parametrize("seed_cell", [True, False], ids=["output_map", "classic"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forwards", "backwards"])
@pytest.mark.parametrize("valid", ["all", "lengths", "mask"])
def test_a_layer_converts_in_both_directions_with_lengths_and_masks(seed_cell, reverse, valid):
    with jax.enable_x64(False):
        p = jaxlstm.init_params(jax.random.key(0), I, H, output_transform=seed_cell)
        names = ("xs",) if valid == "all" else ("xs", valid)

        def fn(xs, v=None):
            kw = {} if v is None else {"seq_lengths" if valid == "lengths" else "mask": v}
            ys, final = jaxlstm.lstm(p, xs, reverse=reverse, **kw)
            return ys, final.cell, final.hidden

        _convert_and_compare(fn, names)


def test_a_bidirectional_stack_with_lengths_converts():
    with jax.enable_x64(False):
        layers = jaxlstm.init_stack(jax.random.key(0), I, H, num_layers=2, bidirectional=True)
        _convert_and_compare(lambda xs, n: jaxlstm.lstm_stack(layers, xs, seq_lengths=n)[0], ("xs", "lengths"))


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_flax_models_holding_jaxlstm_layers_convert(api):
    with jax.enable_x64(False):
        xs0 = jnp.zeros((2, 3, I))
        if api == "linen":
            model = jl.LSTM(H, num_layers=2, bidirectional=True)
            variables = model.init(jax.random.key(0), xs0)
            fn = lambda xs, n: model.apply(variables, xs, seq_lengths=n)
        else:
            model = jn.LSTM(I, H, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
            fn = lambda xs, n: model(xs, seq_lengths=n)
        _convert_and_compare(fn, ("xs", "lengths"))


@pytest.mark.parametrize("num_layers", [1, 2])
def test_the_classic_cell_maps_onto_onnx_lstm_operator(tmp_path, num_layers):
    """``jaxlstm export --format onnx-lstm``'s graph (ONNX's own ``LSTM`` operator, gates reordered to its
    ``i, o, f, c``) against the Flax model in JAX, at several batch sizes and lengths, state carried in."""
    with jax.enable_x64(False):  # float32, as an exported model runs
        from jaxlstm.app import export

        vocab = "abcdefghijk"
        model = jl.CharLM(
            vocab_size=len(vocab), embed_dim=4, hidden_size=H, num_layers=num_layers, output_transform=False
        )
        params = model.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
        # biases and all: every gate block differs, so a swapped pair of gates cannot go unnoticed
        params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(a.size), a.shape), params)
        export.export_onnx_lstm(model, params, vocab, tmp_path / "m.onnx")
        session = ort.InferenceSession(str(tmp_path / "m.onnx"))
        serve = export.serving_function(model, params)
        for b, t in SHAPES:
            rng = np.random.default_rng(b * t)
            tokens = rng.integers(0, len(vocab), (b, t)).astype(np.int32)
            cell, hidden = (rng.standard_normal((num_layers, b, H)).astype(np.float32) for _ in range(2))
            got = session.run(None, {"tokens": tokens, "cell": cell, "hidden": hidden})
            for g, w in zip(got, serve(tokens, cell, hidden)):
                np.testing.assert_allclose(g, np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=f"B={b}, T={t}")


def test_the_output_map_cell_is_refused_by_the_lstm_operator(tmp_path):
    with jax.enable_x64(False):  # float32, as an exported model runs
        from jaxlstm.app import export
        from jaxlstm.app.errors import RunError

        model = jl.CharLM(vocab_size=5, embed_dim=4, hidden_size=H)
        params = model.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
        with pytest.raises(RunError, match="learned output map"):
            export.export_onnx_lstm(model, params, "abcde", tmp_path / "m.onnx")
        assert not list(tmp_path.iterdir())
