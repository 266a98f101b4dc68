"""The Pallas kernels as far as a CPU proves them: their logic through the Pallas interpreter
(against the NumPy reference and against autodiff of the scan), and their lowering for the GPU
(Triton) and the TPU (Mosaic) with no accelerator present (jax.export)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm
from jaxlstm import _pallas
from tests.helpers.problems import make
from tests.helpers.reference import run_batch

B, T, I, H = 3, 6, 4, 5
LENGTHS = np.array([6, 3, 0])
CELLS = pytest.mark.parametrize("seed_cell", [True, False], ids=["output_map", "classic"])


def problem(seed_cell, seed=0):
    _, g, xs, c0, a0 = make(seed, B, T, I, H, seed_cell=seed_cell)
    p = jaxlstm.params_from_gates(**g)
    holes = np.arange(T)[None, :] < LENGTHS[:, None]
    holes[0, [1, 4]] = False  # a step mask with holes, within the lengths
    return g, p, xs, c0, a0, holes


@CELLS
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_interpreted_kernels_match_the_numpy_reference(seed_cell, reverse):
    g, p, xs, c0, a0, holes = problem(seed_cell)
    state = jaxlstm.LSTMState(jnp.asarray(c0), jnp.asarray(a0))
    hs, final = jaxlstm.lstm(
        p, jnp.asarray(xs), state, seq_lengths=LENGTHS, mask=holes, reverse=reverse, impl="pallas_interpret"
    )
    ref_h, ref_c, ref_a = run_batch(g, xs, c0, a0, LENGTHS, reverse=reverse, valid=holes)
    np.testing.assert_allclose(hs, ref_h, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(final.cell, ref_c, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(final.hidden, ref_a, rtol=1e-12, atol=1e-12)


def _loss(run):
    def loss(p, xs, state):
        hs, final = run(p, xs, state)
        w = jnp.sin(jnp.arange(hs.size, dtype=hs.dtype).reshape(hs.shape))
        return jnp.sum(hs * w) + jnp.sum(final.cell**2) + jnp.sum(jnp.sin(final.hidden))

    return jax.value_and_grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize(
    "seed_cell,reverse", [(True, True), (False, False)], ids=["output_map-reverse", "classic-forward"]
)
def test_interpreted_gradients_match_autodiff_of_the_scan(seed_cell, reverse):
    """Values and gradients (weights, inputs, initial state) with lengths, holes and recurrent dropout
    (the other two cell/direction pairs run in the slow tier's export test's lowering only)."""
    _, p, xs, c0, a0, holes = problem(seed_cell, seed=1)
    state = jaxlstm.LSTMState(jnp.asarray(c0), jnp.asarray(a0))
    drop = jnp.asarray(np.random.default_rng(2).binomial(1, 0.7, (B, H)) / 0.7)
    kw = dict(seq_lengths=LENGTHS, mask=holes, reverse=reverse, recurrent_mask=drop)
    got = _loss(lambda p, x, s: jaxlstm.lstm(p, x, s, impl="pallas_interpret", **kw))(p, jnp.asarray(xs), state)
    ref = _loss(lambda p, x, s: jaxlstm.lstm(p, x, s, impl="scan", bptt="autodiff", **kw))(p, jnp.asarray(xs), state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.slow  # the interpreter on several programs: the slow tier (CI)
def test_batch_blocks_give_the_same_result(monkeypatch):
    """The grid over batch blocks (one program per block on a device) changes nothing."""
    _, g, xs, c0, a0 = make(3, 4, 5, 3, 4)
    p = jaxlstm.params_from_gates(**g)
    state = jaxlstm.LSTMState(jnp.asarray(c0), jnp.asarray(a0))
    xs = jnp.swapaxes(jnp.asarray(xs), 0, 1)  # time-major, as the kernels take it
    valid = jnp.arange(5)[:, None] < jnp.array([5, 2, 0, 4])[None, :]

    def run():  # traced afresh on each call (a new jit), so the block size is read again
        return jax.jit(_loss(lambda p, x, s: _pallas.layer(p, x, s, valid, None, False, 1, True)))(p, xs, state)

    whole = run()
    monkeypatch.setitem(_pallas.BLOCK_BATCH, "interpret", 2)
    assert _pallas._block_batch("interpret", 4) == 2
    blocks = run()
    for a, b in zip(jax.tree.leaves(blocks), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


@pytest.mark.slow  # the interpreter in bfloat16: the slow tier (CI)
def test_interpreted_bfloat16_keeps_a_float32_state():
    """bf16 weights and inputs (output-map cell), float32 state and sums: outputs within 1e-2 of
    float32 on the same weights, gradients within 2%."""
    with jax.enable_x64(False):
        p32 = jaxlstm.init_params(jax.random.key(0), 8, 16)
        p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p32)
        p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p16)
        xs16 = jax.random.normal(jax.random.key(1), (4, 12, 8)).astype(jnp.bfloat16)
        lengths = np.array([12, 7, 1, 0])
        h16, f16 = jaxlstm.lstm(p16, xs16, seq_lengths=lengths, impl="pallas_interpret")
        h32, _ = jaxlstm.lstm(p32, xs16.astype(jnp.float32), seq_lengths=lengths, impl="scan")
        assert h16.dtype == jnp.bfloat16 and f16.cell.dtype == f16.hidden.dtype == jnp.float32
        assert float(jnp.abs(h16.astype(jnp.float32) - h32).max()) < 1e-2

        def loss(p, impl):
            hs, _ = jaxlstm.lstm(p, xs16.astype(p.dtype), seq_lengths=lengths, impl=impl)
            return jnp.sum(hs.astype(jnp.float32) * jnp.cos(jnp.arange(16.0))[None, None, :])

        g16 = jax.grad(loss)(p16, "pallas_interpret")
        g32 = jax.grad(loss)(p32, "scan")
        for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
            a, b = np.asarray(a, np.float32), np.asarray(b)
            assert np.linalg.norm(a - b) <= 0.02 * np.linalg.norm(b), (np.linalg.norm(a - b), np.linalg.norm(b))


@pytest.mark.slow  # the interpreter under the stack and a module: the slow tier (CI)
def test_layouts_stacks_and_modules_reach_the_kernels():
    """Unbatched and time-major inputs, a bidirectional stack and the linen module, against the scan."""
    _, p, xs, c0, a0, _ = problem(True)
    xs = jnp.asarray(xs)
    for args, kw in (((xs[0],), {}), ((jnp.swapaxes(xs, 0, 1),), {"time_major": True})):
        got = jaxlstm.lstm(p, *args, impl="pallas_interpret", **kw)
        ref = jaxlstm.lstm(p, *args, impl="scan", **kw)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    layers = jaxlstm.init_stack(jax.random.key(0), I, H, bidirectional=True, dtype=jnp.float64)
    got = jaxlstm.lstm_stack(layers, xs, seq_lengths=LENGTHS, impl="pallas_interpret")
    ref = jaxlstm.lstm_stack(layers, xs, seq_lengths=LENGTHS, impl="scan")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)

    from jaxlstm.linen import LSTM

    outs = []
    for impl in ("pallas_interpret", "scan"):
        module = LSTM(hidden_size=H, impl=impl, param_dtype=jnp.float64)
        outs.append(module.apply(module.init(jax.random.key(0), xs), xs))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-12, atol=1e-12)


def test_on_the_cpu_pallas_runs_the_scan_and_what_the_kernels_cannot_run_is_named():
    _, p, xs, *_ = problem(True)
    xs = jnp.asarray(xs)
    got = jaxlstm.lstm(p, xs, seq_lengths=LENGTHS, impl="pallas")  # no kernels on the CPU: the scan
    ref = jaxlstm.lstm(p, xs, seq_lengths=LENGTHS, impl="scan")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"cannot run bptt='autodiff'.*impl='scan'"):
        jaxlstm.lstm(p, xs, impl="pallas_interpret", bptt="autodiff")
    lstmp = jaxlstm.init_params(jax.random.key(0), I, H, proj_size=2)
    for impl in ("pallas_interpret", "pallas"):  # refused on the CPU too, where "pallas" lowers to the scan
        with pytest.raises(ValueError, match=r"the Pallas kernels need: no projection"):
            jaxlstm.lstm(lstmp, xs.astype(jnp.float32), impl=impl)
        with pytest.raises(ValueError, match=r"cannot run this call.*checkpoint_every"):
            jaxlstm.lstm(p, xs, impl=impl, checkpoint_every=2)
    gpu = "; ".join(_pallas.unsupported(p, jnp.ones((T, 3, I)), "gpu", checkpoint_every=None))
    assert "hidden size that is a power of two >= 16 (received 5)" in gpu and "batch" in gpu
    assert "multiple of 128 (received 5)" in "; ".join(_pallas.unsupported(p, xs, "tpu", checkpoint_every=None))
    big = jaxlstm.init_params(jax.random.key(0), I, 128)
    assert _pallas.unsupported(big, jnp.ones((T, 16, I)), "gpu", checkpoint_every=None) == []
    assert _pallas.unsupported(big, jnp.ones((T, 16, I)), "tpu", checkpoint_every=None) == []


EXPORT_B, EXPORT_H = 32, 128
TRITON = "__gpu$xla.gpu.triton"
TARGETS = {"cuda": TRITON, "tpu": "tpu_custom_call"}


def _exported(platform, seed_cell, grad):
    p = jaxlstm.init_params(jax.random.key(0), 16, EXPORT_H, output_transform=seed_cell, dtype=jnp.float32)
    xs = jnp.zeros((EXPORT_B, 8, 16), jnp.float32)
    lengths = jnp.full((EXPORT_B,), 8, jnp.int32)

    def forward(p, xs):
        return jaxlstm.lstm(p, xs, seq_lengths=lengths, reverse=True, impl="pallas")[0].sum()

    f = jax.grad(forward, argnums=(0, 1)) if grad else forward
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]
    return jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(p, xs).mlir_module()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@CELLS
def test_exported_programs_carry_the_kernels(platform, seed_cell):
    """Exported from this CPU for a GPU and a TPU: the forward pass holds the forward kernel, its gradient
    both kernels; exported for the CPU, neither (the scan)."""
    with jax.enable_x64(False):
        fwd = _exported(platform, seed_cell, grad=False)
        grad = _exported(platform, seed_cell, grad=True)
    assert TARGETS[platform] in set(re.findall(r"custom_call @([\w$.]+)", grad))
    assert "jaxlstm_forward" in fwd and "jaxlstm_backward" not in fwd
    assert "jaxlstm_forward" in grad and "jaxlstm_backward" in grad
    if platform == "cuda" and seed_cell:
        with jax.enable_x64(False):
            cpu = _exported("cpu", seed_cell, grad=True)
        assert "jaxlstm_" not in cpu and "custom_call @" not in cpu.replace("custom_call @Sharding", "")
