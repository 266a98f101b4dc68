"""jaxlstm inside ``jax.shard_map``: the batch split along a mesh axis, the weights replicated.

Found while splitting a small batch over two CPU devices: the zero initial state
does not vary along the mesh axis while a step's new state does, and
``lax.scan`` refused the carry ("carry input and carry output must have equal
types"). A one-device mesh has the same typing rules, so these run in the fast
tier and compare every output and gradient with the same call outside
``shard_map`` (which the other tests compare with the NumPy reference);
``tests/integration/test_shard_map_devices.py`` splits a batch over two CPU
devices.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxlstm
from jaxlstm import linen as jl

F64 = jnp.float64
MESH = Mesh(np.array(jax.devices()[:1]), ("b",))
B, T, I, H = 4, 5, 3, 6


def _inputs(seed=0):
    xs = jax.random.normal(jax.random.key(seed), (B, T, I))
    lengths = jnp.array([T, 2, 0, T - 1])
    return xs, lengths


def _outputs_and_gradients(fn, params, xs, *batched):
    """``fn``'s outputs, and the gradients of a loss of them with respect to the weights and ``xs``."""

    def loss(p, x):
        return sum(jnp.sum(jnp.sin(o.astype(jnp.float64))) for o in jax.tree.leaves(fn(p, x, *batched)))

    return fn(params, xs, *batched), *jax.grad(loss, argnums=(0, 1))(params, xs)


def _assert_same_inside_shard_map(fn, params, xs, *batched, rtol=1e-12, atol=1e-12, **shard_map_options):
    """``fn(params, xs, *batched)`` (every array of ``xs`` and ``batched`` batch-leading) with and without shard_map."""
    run = functools.partial(_outputs_and_gradients, fn)
    expected = jax.jit(run)(params, xs, *batched)
    specs = (P(), P("b")) + (P("b"),) * len(batched)
    sharded = jax.jit(
        jax.shard_map(run, mesh=MESH, in_specs=specs, out_specs=(P("b"), P(), P("b")), **shard_map_options)
    )
    got = sharded(params, xs, *batched)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("seed_cell", [True, False])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bptt": "autodiff"},
        {"checkpoint_every": 2},
        {"bptt": "autodiff", "checkpoint_every": 2},
        {"reverse": True},
    ],
)
def test_layer_with_lengths(seed_cell, options):
    params = jaxlstm.init_params(jax.random.key(1), I, H, output_transform=seed_cell, dtype=F64)
    xs, lengths = _inputs()

    def fn(p, x, n):
        return jaxlstm.lstm(p, x, seq_lengths=n, **options)

    _assert_same_inside_shard_map(fn, params, xs, lengths)


def test_step_mask_recurrent_mask_and_a_state_made_inside():
    params = jaxlstm.init_params(jax.random.key(2), I, H, dtype=F64)
    xs, _ = _inputs(1)
    step_mask = jnp.array([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 1, 1, 0, 1]], bool)
    drop = jnp.where(jax.random.uniform(jax.random.key(3), (B, H)) > 0.3, 1 / 0.7, 0.0)

    def fn(p, x, m, d):
        state = jaxlstm.LSTMState(jnp.ones((x.shape[0], H)) * 0.5, jnp.zeros((x.shape[0], H)))  # replicated values
        return jaxlstm.lstm(p, x, state, mask=m, recurrent_mask=d)

    _assert_same_inside_shard_map(fn, params, xs, step_mask, drop)


def test_projection():
    params = jaxlstm.init_params(jax.random.key(4), I, H, proj_size=2, dtype=F64)
    xs, lengths = _inputs(2)
    _assert_same_inside_shard_map(lambda p, x, n: jaxlstm.lstm(p, x, seq_lengths=n), params, xs, lengths)


def test_feature_major_forward():
    """At H >= 256 and a local batch >= 16 the inference forward runs feature-major on the CPU."""
    params = jaxlstm.init_params(jax.random.key(5), 4, 256, dtype=F64)
    xs = jax.random.normal(jax.random.key(6), (3, 16, 4))  # time-major
    fn = jax.jit(lambda p, x: jaxlstm.lstm(p, x, time_major=True))
    spec = P(None, "b")
    sharded = jax.jit(jax.shard_map(fn, mesh=MESH, in_specs=(P(), spec), out_specs=(spec, P("b"))))
    for g, e in zip(jax.tree.leaves(sharded(params, xs)), jax.tree.leaves(fn(params, xs))):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)


def test_bidirectional_stack():
    layers = jaxlstm.init_stack(jax.random.key(7), I, H, num_layers=2, bidirectional=True, dtype=F64)
    xs, lengths = _inputs(3)
    _assert_same_inside_shard_map(lambda p, x, n: jaxlstm.lstm_stack(p, x, seq_lengths=n), layers, xs, lengths)


def test_linen_module():
    model = jl.LSTM(hidden_size=H, num_layers=2, dtype=F64, param_dtype=F64)
    xs, lengths = _inputs(4)
    variables = model.init(jax.random.key(8), xs)
    _assert_same_inside_shard_map(lambda v, x, n: model.apply(v, x, seq_lengths=n), variables, xs, lengths)


def test_half_precision():
    params = jax.tree.map(
        lambda a: a.astype(jnp.bfloat16), jaxlstm.init_params(jax.random.key(9), I, H, output_transform=True)
    )
    xs, lengths = _inputs(5)
    for bptt in ("custom", "autodiff"):
        _assert_same_inside_shard_map(
            lambda p, x, n, bptt=bptt: jaxlstm.lstm(p, x.astype(jnp.bfloat16), seq_lengths=n, bptt=bptt),
            params,
            xs,
            lengths,
            rtol=1e-2,
            atol=1e-2,
        )


def test_nnx_module():
    from flax import nnx

    from jaxlstm import nnx as jn

    model = jn.LSTM(I, H, num_layers=2, bidirectional=True, dtype=F64, param_dtype=F64, rngs=nnx.Rngs(10))
    graphdef, state = nnx.split(model)
    xs, lengths = _inputs(6)

    def fn(s, x, n):
        return nnx.merge(graphdef, s)(x, seq_lengths=n)

    _assert_same_inside_shard_map(fn, state, xs, lengths)


def test_pallas_kernels_with_check_vma_off():
    """The Pallas kernels declare outputs without mesh axes: inside shard_map they need ``check_vma=False``
    (then the weights' gradient is per shard, to be summed with ``jax.lax.psum``; one device here)."""
    params = jaxlstm.init_params(jax.random.key(11), I, 16, dtype=jnp.float32)
    xs = jax.random.normal(jax.random.key(12), (16, T, I), jnp.float32)

    def fn(p, x):
        return jaxlstm.lstm(p, x, impl="pallas_interpret")

    _assert_same_inside_shard_map(fn, params, xs, rtol=1e-5, atol=1e-5, check_vma=False)
