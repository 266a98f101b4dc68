"""Exported once with symbolic batch and time (``jax.export``), run at several concrete shapes:
the same numbers as the direct call, forward and gradient, for every layer and module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

import jaxlstm
import jaxlstm.linen as jl
import jaxlstm.nnx as jn

I, H = 3, 5
SHAPES = ((1, 1), (2, 7), (17, 4))  # (B, T): B = 17 is past the batch size where the layout changes


def _inputs(b, t, dtype=jnp.float32, seed=0):
    xs = jax.random.normal(jax.random.key(seed), (b, t, I), dtype)
    lengths = jnp.asarray(np.random.default_rng(seed).integers(0, t + 1, b), jnp.int32)
    holes = np.random.default_rng(seed + 1).random((b, t)) < 0.7
    mask = jnp.asarray(holes & (np.arange(t)[None] < np.asarray(lengths)[:, None]))  # agrees with lengths
    return xs, lengths, mask


def _check_export(fn, args_at, symbolic_args, rtol=1e-5, atol=1e-6):
    """Export ``fn`` at ``symbolic_args``, serialise and read back, compare with ``fn`` at each shape."""
    exported = export.export(jax.jit(fn))(*symbolic_args)
    again = export.deserialize(exported.serialize())
    for b, t in SHAPES:
        args = args_at(b, t)
        want = fn(*args)
        got = again.call(*args)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"at B={b}, T={t}")
    return exported


def _specs(time_major=False):
    b, t = export.symbolic_shape("b, t")
    xs = jax.ShapeDtypeStruct((t, b, I) if time_major else (b, t, I), jnp.float32)
    return xs, jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.bool_)


@pytest.mark.parametrize("seed_cell", [True, False], ids=["output_map", "classic"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"reverse": True},
        {"lengths": True},
        {"mask": True, "reverse": True},
        {"proj_size": 2},
        {"time_major": True, "lengths": True},
        {"bptt": "autodiff"},
        {"checkpoint_every": 2, "lengths": True},
        {"impl": "scan"},
    ],
    ids=lambda o: "-".join(o) or "plain",
)
def test_lstm_exports_with_symbolic_batch_and_time(seed_cell, options):
    with jax.enable_x64(False):
        options = dict(options)
        use_lengths, use_mask = options.pop("lengths", False), options.pop("mask", False)
        time_major = options.get("time_major", False)
        p = jaxlstm.init_params(
            jax.random.key(1), I, H, output_transform=seed_cell, proj_size=options.pop("proj_size", None)
        )

        def run(p, xs, lengths, mask):
            kw = dict(options, seq_lengths=lengths if use_lengths else None, mask=mask if use_mask else None)
            ys, final = jaxlstm.lstm(p, xs, **kw)
            return ys, final

        def loss(p, xs, lengths, mask):
            ys, final = run(p, xs, lengths, mask)
            return jnp.sum(ys**2) + jnp.sum(jnp.sin(final.cell))

        def args_at(b, t):
            xs, lengths, mask = _inputs(b, t)
            return p, (jnp.swapaxes(xs, 0, 1) if time_major else xs), lengths, mask

        specs = (p, *_specs(time_major))
        _check_export(run, args_at, specs)
        _check_export(jax.grad(loss, argnums=(0, 1)), args_at, specs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("merge", ["concat", "sum"])
def test_bidirectional_and_stack_export(merge):
    with jax.enable_x64(False):
        layers = jaxlstm.init_stack(jax.random.key(0), I, H, num_layers=2, bidirectional=True, merge=merge)

        def bi(layers, xs, lengths, mask):
            return jaxlstm.bidirectional(layers[0], xs, seq_lengths=lengths, merge=merge)

        def stack(layers, xs, lengths, mask):
            return jaxlstm.lstm_stack(layers, xs, seq_lengths=lengths, mask=mask, merge=merge)

        def args_at(b, t):
            return (layers, *_inputs(b, t))

        specs = (layers, *_specs())
        _check_export(bi, args_at, specs)
        _check_export(stack, args_at, specs)
        grad = jax.grad(lambda *a: jnp.sum(stack(*a)[0] ** 2), argnums=(0, 1))
        _check_export(grad, args_at, specs, rtol=1e-4, atol=1e-5)


def test_lstm_step_exports_with_a_symbolic_batch():
    with jax.enable_x64(False):
        p = jaxlstm.init_params(jax.random.key(1), I, H)
        (b,) = export.symbolic_shape("b")
        state = jaxlstm.LSTMState(jax.ShapeDtypeStruct((b, H), jnp.float32), jax.ShapeDtypeStruct((b, H), jnp.float32))
        exported = export.export(jax.jit(jaxlstm.lstm_step))(p, state, jax.ShapeDtypeStruct((b, I), jnp.float32))
        for n in (1, 4):
            s = jaxlstm.LSTMState(jnp.full((n, H), 0.1), jnp.full((n, H), -0.2))
            x = jnp.ones((n, I))
            for g, w in zip(jax.tree.leaves(exported.call(p, s, x)), jax.tree.leaves(jaxlstm.lstm_step(p, s, x))):
                np.testing.assert_allclose(g, w, rtol=1e-6)


def test_the_layout_choice_takes_a_valid_path_for_a_symbolic_batch():
    """At H = 256 a concrete batch of 16 or more takes the feature-major scan; a symbolic one takes the
    row-major scan (it serves every batch size), and both give the same numbers."""
    with jax.enable_x64(False):
        p = jaxlstm.init_params(jax.random.key(1), I, 256)
        xs_spec = _specs()[0]

        def args_at(b, t):
            return p, _inputs(b, t)[0]

        _check_export(lambda p, xs: jaxlstm.lstm(p, xs)[0], args_at, (p, xs_spec), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_flax_modules_export(api, bidirectional):
    with jax.enable_x64(False):
        xs0 = _inputs(2, 3)[0]
        if api == "linen":
            model = jl.LSTM(H, num_layers=2, bidirectional=bidirectional, output_transform=not bidirectional)
            variables = model.init(jax.random.key(0), xs0)

            def run(variables, xs, lengths, mask):
                return model.apply(variables, xs, seq_lengths=lengths)

            state = variables
        else:
            model = jn.LSTM(I, H, num_layers=2, bidirectional=bidirectional, rngs=nnx.Rngs(0))
            graphdef, nnx_state = nnx.split(model)
            state, treedef = jax.tree.flatten(nnx_state)  # the arrays: a program's arguments are arrays

            def run(state, xs, lengths, mask):
                return nnx.merge(graphdef, treedef.unflatten(state))(xs, seq_lengths=lengths)

        def args_at(b, t):
            return (state, *_inputs(b, t))

        _check_export(run, args_at, (state, *_specs()))
