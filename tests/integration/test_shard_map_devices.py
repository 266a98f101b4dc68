"""A batch split over two CPU devices with ``jax.shard_map``: the same outputs and gradients as on one.

XLA reads the device count once, when JAX starts, so this runs in a fresh
process (``--xla_force_host_platform_device_count=2``). The weights are
replicated; the gradient taken inside ``shard_map`` is the gradient of the sum
of the two halves' losses, which must equal the whole batch's gradient.
"""

import subprocess
import sys
import textwrap

import pytest

from tests.helpers.processes import fast_compile_env

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jaxlstm

    assert len(jax.devices()) == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("b",))
    xs = jax.random.normal(jax.random.key(0), (4, 7, 3), jnp.float64)
    lengths = jnp.array([7, 3, 0, 5])

    for seed_cell in (True, False):
        for options in ({}, {"checkpoint_every": 3}, {"bptt": "autodiff"}):
            p = jaxlstm.init_params(jax.random.key(1), 3, 5, output_transform=seed_cell, dtype=jnp.float64)

            def loss(p, x, n):
                hs, final = jaxlstm.lstm(p, x, seq_lengths=n, **options)
                return jnp.sum(jnp.sin(hs)) + jnp.sum(final.cell**2)

            def run(p, x, n):
                return jaxlstm.lstm(p, x, seq_lengths=n, **options)[0], *jax.grad(loss, argnums=(0, 1))(p, x, n)

            specs = (P(), P("b"), P("b"))
            sharded = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=(P("b"), P(), P("b"))))
            put = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip((p, xs, lengths), specs)]
            got = sharded(*put)
            assert len(got[0].sharding.device_set) == 2  # the outputs live on both devices
            want = jax.jit(run)(p, xs, lengths)
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-10, atol=1e-12)
    # the Pallas kernels (interpreted here) need check_vma=False; the weights' gradient is then per shard
    p = jaxlstm.init_params(jax.random.key(2), 3, 16, dtype=jnp.float64)
    x16 = jax.random.normal(jax.random.key(3), (16, 5, 3), jnp.float64)

    def pallas_loss(p, x):
        return jnp.sum(jnp.sin(jaxlstm.lstm(p, x, impl="pallas_interpret")[0]))

    summed = jax.jit(
        jax.shard_map(
            lambda p, x: jax.lax.psum(jax.grad(pallas_loss)(p, x), "b"),
            mesh=mesh, in_specs=(P(), P("b")), out_specs=P(), check_vma=False,
        )
    )
    for g, w in zip(jax.tree.leaves(summed(p, x16)), jax.tree.leaves(jax.grad(pallas_loss)(p, x16))):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-10, atol=1e-12)
    print("same on two devices")
    """
)


def test_batch_split_over_two_cpu_devices():
    env = fast_compile_env()
    env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "same on two devices" in out.stdout


JIT_SCRIPT = textwrap.dedent(
    """
    import re
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jaxlstm

    mesh = Mesh(np.array(jax.devices()), ("data",))
    xs = jax.random.normal(jax.random.key(0), (4, 7, 3), jnp.float64)
    lengths = jnp.array([7, 3, 0, 5])
    for seed_cell in (True, False):
        p = jaxlstm.init_params(jax.random.key(1), 3, 5, output_transform=seed_cell, dtype=jnp.float64)

        def loss(p, x, n):
            hs, final = jaxlstm.lstm(p, x, seq_lengths=n)
            return jnp.sum(jnp.sin(hs)) + jnp.sum(final.cell**2)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        put = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip((p, xs, lengths), (P(), P("data"), P("data")))]
        hlo = grad.lower(*put).compile().as_text()
        gathers = re.findall(r"all-gather\\(", hlo)
        assert not gathers, f"{len(gathers)} all-gathers: the batch is gathered onto every device"
        for g, w in zip(jax.tree.leaves(grad(*put)), jax.tree.leaves(jax.grad(loss, argnums=(0, 1))(p, xs, lengths))):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-10, atol=1e-12)
    print("no gather")
    """
)


def test_a_batch_split_by_jit_stays_split_in_the_backward_pass():
    """jit over a batch split across devices (what fit(mesh=...) does): the weight gradients are summed
    per device and all-reduced; the layer's backward pass used to gather the whole batch onto every
    device (a reshape merged the split batch axis into time), which made two CPU devices slower than one."""
    env = fast_compile_env()
    env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
    out = subprocess.run([sys.executable, "-c", JIT_SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no gather" in out.stdout


EXPLICIT_SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    import jaxlstm
    from jaxlstm import training
    from jaxlstm.linen import CharLM

    # jax.make_mesh's default: Explicit axes, where an array's sharding is part of its type
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,))
    key = jax.random.key(0)
    xs = jax.random.normal(key, (4, 7, 3), jnp.float64)
    lengths = jnp.array([7, 3, 0, 5])
    p = jaxlstm.init_params(jax.random.key(1), 3, 5, dtype=jnp.float64)
    q = jaxlstm.init_params(jax.random.key(2), 5, 5, dtype=jnp.float64, output_transform=False)
    layers = {
        "lstm": lambda p, x, n: jaxlstm.lstm(p, x, seq_lengths=n)[0],
        "reverse, time-major": lambda p, x, n: jaxlstm.lstm(p, x.swapaxes(0, 1), time_major=True, reverse=True)[0],
        "checkpoint_every=3": lambda p, x, n: jaxlstm.lstm(p, x, seq_lengths=n, checkpoint_every=3)[0],
        "autodiff": lambda p, x, n: jaxlstm.lstm(p, x, bptt="autodiff")[0],
        "bidirectional": lambda p, x, n: jaxlstm.bidirectional(jaxlstm.BidirectionalParams(p, p), x, seq_lengths=n)[0],
        "stack": lambda p, x, n: jaxlstm.lstm_stack([p, q], x, seq_lengths=n)[0],
    }
    for name, layer in layers.items():
        loss = lambda p, x, n: jnp.sum(jnp.sin(layer(p, x, n)))
        want = jax.grad(loss, argnums=(0, 1))(p, xs, lengths)
        with jax.set_mesh(mesh):
            specs = (P(), P("data"), P("data"))
            put = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip((p, xs, lengths), specs)]
            got = jax.jit(jax.grad(loss, argnums=(0, 1)))(*put)
            assert jax.typeof(got[1]).sharding.spec[0] == "data", (name, jax.typeof(got[1]))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-10, atol=1e-12, err_msg=name)

    # fit(mesh=...) with that mesh: a Flax model whose nn.Embed states no output sharding
    model = CharLM(vocab_size=11, embed_dim=4, hidden_size=6)
    tokens = jax.random.randint(key, (4, 9), 0, 11)
    def loss_fn(params, state, batch, rng, carry):
        logits = state.apply_fn({"params": params}, batch[:, :-1])
        return training.sequence_cross_entropy(logits, batch[:, 1:]), ({}, None)
    def run(mesh):
        state = training.TrainState.create(
            apply_fn=model.apply, params=model.init(key, tokens)["params"], tx=optax.adam(1e-2)
        )
        out = training.fit(state, training.make_train_step(loss_fn), lambda s: tokens, num_steps=3,
                           rng=key, progress=False, handle_signals=False, mesh=mesh)
        return out.state.params
    for a, b in zip(jax.tree.leaves(run(mesh)), jax.tree.leaves(run(None))):  # float32: the order of the sums
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    print("explicit ok")
    """
)


def test_a_batch_split_over_explicit_mesh_axes():
    """``jax.make_mesh`` makes Explicit axes by default, where a sharding is part of an array's type: the
    layers' zero states, padding and weight-gradient sums name theirs (they were type errors), and
    ``fit`` takes such a mesh for any model; the values equal one device's."""
    env = fast_compile_env()
    env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
    out = subprocess.run([sys.executable, "-c", EXPLICIT_SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "explicit ok" in out.stdout
