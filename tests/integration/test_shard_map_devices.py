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
