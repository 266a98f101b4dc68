"""The cuDNN path as far as a CPU proves it: the weight packing (through jax.experimental.rnn.lstm_ref) and
the implementation switch. The cuDNN call itself needs a CUDA GPU (benchmarks/device.py measures it there)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm
from jaxlstm import _cudnn

B, T, I, H = 3, 6, 4, 5


def classic(dtype=jnp.float64):
    p = jaxlstm.init_params(jax.random.key(0), I, H, output_transform=False, dtype=dtype)
    return p._replace(b=jax.random.normal(jax.random.key(5), p.b.shape, dtype))


@pytest.mark.slow  # trains or runs a peer: the slow tier (CI)
def test_packing_into_cudnn_layout_reproduces_the_layer_and_its_gradients():
    p = classic()
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float64)
    s0 = jaxlstm.LSTMState(
        jax.random.normal(jax.random.key(2), (B, H), jnp.float64),
        jnp.tanh(jax.random.normal(jax.random.key(3), (B, H))),
    )
    lengths = jnp.array([6, 3, 1], jnp.int32)
    ref = jaxlstm.lstm(p, xs, s0, seq_lengths=lengths)
    got = _cudnn.reference(p, xs, s0, lengths)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)

    def loss(run, p, xs):
        hs, final = run(p, xs)
        return jnp.sum(jnp.sin(hs)) + jnp.sum(final.cell**2)

    g_ref = jax.grad(loss, argnums=(1, 2))(lambda p, x: jaxlstm.lstm(p, x, s0, seq_lengths=lengths), p, xs)
    g_got = jax.grad(loss, argnums=(1, 2))(lambda p, x: _cudnn.reference(p, x, s0, lengths), p, xs)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_pack_has_cudnn_size_and_gate_order():
    from jax.experimental import rnn

    p = classic()
    w = _cudnn.pack(p)
    assert w.shape == (rnn.get_num_params_in_lstm(I, H, 1, False),)
    w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(w, I, H, 1, False)
    # cuDNN's first block is the input gate, jaxlstm's f2 (the sigmoid scaling the candidate)
    np.testing.assert_array_equal(w_ih[0][:H], p.gates()["W_f2"][:, H:])
    np.testing.assert_array_equal(w_hh[0][H : 2 * H], p.gates()["W_f1"][:, :H])
    np.testing.assert_array_equal(b_hh[0], 0.0)


def test_impl_switch_on_a_cpu():
    p = classic()
    xs = jnp.ones((B, T, I))
    if jax.default_backend() != "gpu":
        assert not _cudnn.available()
    auto = jaxlstm.lstm(p, xs)  # on the CPU, auto is the scan
    scan = jaxlstm.lstm(p, xs, impl="scan")
    for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(scan)):
        np.testing.assert_array_equal(a, b)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match=r"impl='cudnn' needs a CUDA GPU.*runs on 'cpu'.*impl='auto'"):
            jaxlstm.lstm(p, xs, impl="cudnn")
    with pytest.raises(
        ValueError, match=r"impl must be one of \('auto', 'scan', 'cudnn', 'pallas', .*received 'triton'"
    ):
        jaxlstm.lstm(p, xs, impl="triton")
    # the stack and the modules pass it on
    ys, _ = jaxlstm.lstm_stack((p, p._replace(w_x=p.w_h)), xs, impl="scan")
    assert ys.shape == (B, T, H)


def test_what_cudnn_cannot_run_is_named():
    seed = jaxlstm.init_params(jax.random.key(0), I, H, dtype=jnp.bfloat16)
    reasons = _cudnn.unsupported(
        seed, jnp.ones((T, I), jnp.bfloat16), reverse=True, step_mask=True, recurrent_mask=True
    )
    joined = "; ".join(reasons)
    for expected in ("classic cell", "rank 3", "reverse=False", "step mask", "recurrent dropout", "bfloat16"):
        assert expected in joined
    assert _cudnn.unsupported(classic(), jnp.ones((B, T, I)), reverse=False, step_mask=None, recurrent_mask=None) == []
