"""LSTMP (a projected hidden state, PyTorch's proj_size) against the NumPy reference, autodiff and PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm
from jaxlstm import interop
from tests.helpers.reference import random_gates, run_batch

B, T, I, H, P = 3, 7, 4, 6, 3


def problem(seed, seed_cell):
    rng = np.random.default_rng(seed)
    g = random_gates(rng, I, H, seed_cell=seed_cell, proj_size=P)
    xs = rng.normal(size=(B, T, I))
    c0, a0 = rng.normal(size=(B, H)) * 0.5, np.tanh(rng.normal(size=(B, P)))
    return rng, g, xs, c0, a0


@pytest.mark.parametrize("seed_cell", [True, False], ids=["output_map", "classic"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_projection_matches_numpy_reference_with_a_mask(seed_cell, reverse):
    rng, g, xs, c0, a0 = problem(1, seed_cell)
    valid = np.array([[1, 0, 1, 1, 0, 1, 1], [0, 0, 1, 1, 1, 1, 1], [1] * 7], bool)
    p = jaxlstm.params_from_gates(**g)
    assert (p.hidden_size, p.output_size, p.proj_size) == (H, P, P)
    hs, final = jaxlstm.lstm(p, xs, jaxlstm.LSTMState(c0, a0), mask=jnp.asarray(valid), reverse=reverse)
    ref_h, ref_c, ref_a = run_batch(g, xs, c0, a0, reverse=reverse, valid=valid)
    assert hs.shape == (B, T, P) and final.cell.shape == (B, H)
    np.testing.assert_allclose(hs, ref_h, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(final.cell, ref_c, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(final.hidden, ref_a, rtol=1e-12, atol=1e-12)
    # the per-gate view round-trips, W_hr included
    q = jaxlstm.params_from_gates(**p.gates())
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(p)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("seed_cell", [True, False], ids=["output_map", "classic"])
@pytest.mark.parametrize("checkpoint_every", [None, 3], ids=["saved", "chunked"])
def test_projection_custom_backward_matches_autodiff(seed_cell, checkpoint_every):
    rng, g, xs, c0, a0 = problem(2, seed_cell)
    p = jaxlstm.params_from_gates(**g)
    s0 = jaxlstm.LSTMState(jnp.asarray(c0), jnp.asarray(a0))
    lengths = jnp.array([7, 4, 0])
    w = jnp.asarray(rng.normal(size=(B, T, P)))

    def loss(p, xs, s0, bptt):
        hs, f = jaxlstm.lstm(p, xs, s0, seq_lengths=lengths, bptt=bptt, checkpoint_every=checkpoint_every)
        return jnp.sum(hs * w) + jnp.sum(f.cell**2) + jnp.sum(jnp.sin(f.hidden))

    ref = jax.grad(loss, argnums=(0, 1, 2))(p, xs, s0, "autodiff")
    got = jax.grad(loss, argnums=(0, 1, 2))(p, xs, s0, "custom")
    assert got[0].w_hr.shape == (H, P)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.slow  # many compilations: the slow tier (CI)
def test_projection_in_stacks_and_init():
    layers = jaxlstm.init_stack(
        jax.random.key(0), I, H, num_layers=2, bidirectional=True, proj_size=P, dtype=jnp.float64
    )
    assert layers[1].forward.input_size == 2 * P and layers[0].forward.w_hr.shape == (H, P)
    ys, states = jaxlstm.lstm_stack(layers, jnp.ones((B, T, I)))
    assert ys.shape == (B, T, 2 * P) and states[1].backward.hidden.shape == (B, P)
    assert states[1].backward.cell.shape == (B, H)
    p = jaxlstm.init_params(jax.random.key(0), I, H, proj_size=P, dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"state.hidden has shape \(3, 6\); expected \(3, 3\).*proj_size 3"):
        jaxlstm.lstm(p, jnp.ones((B, T, I)), jaxlstm.zero_state(H, (B,), jnp.float64))
    with pytest.raises(ValueError, match=r"w_hr \(the projection\) must have shape \(H, P\) = \(6, 3\)"):
        jaxlstm.lstm(p._replace(w_hr=p.w_hr.T), jnp.ones((B, T, I)))
    with pytest.raises(ValueError, match="only PyTorch's nn.LSTM"):
        interop.to_keras(p._replace(w_o=None, b_o=None))


@pytest.mark.slow  # runs PyTorch: the slow tier (CI)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_torch_proj_size_parity_outputs_states_and_input_gradients(torch, bidirectional):
    torch.manual_seed(0)
    m = torch.nn.LSTM(I, H, num_layers=2, proj_size=P, batch_first=True, bidirectional=bidirectional).double()
    layers = interop.from_torch_lstm(m)
    D = 2 if bidirectional else 1
    x = np.random.default_rng(3).normal(size=(B, T, I))
    xt = torch.tensor(x, requires_grad=True)
    out, (hn, cn) = m(xt)
    (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin()).sum().backward()

    def loss(xs):
        ys, _ = jaxlstm.lstm_stack(layers, xs)
        return jnp.sum(ys * jnp.sin(jnp.arange(ys.size, dtype=ys.dtype).reshape(ys.shape))), ys

    (_, ys), dx = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(x))
    _, finals = jaxlstm.lstm_stack(layers, jnp.asarray(x))
    np.testing.assert_allclose(ys, out.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    for k, state in enumerate(finals):  # torch's h_n / c_n: (num_layers * D, B, P) / (..., H)
        dirs = [state.forward, state.backward] if bidirectional else [state]
        for d, s in enumerate(dirs):
            np.testing.assert_allclose(s.hidden, hn[k * D + d].detach().numpy(), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(s.cell, cn[k * D + d].detach().numpy(), rtol=1e-10, atol=1e-12)
    # and back into a fresh torch module, exactly
    m2 = torch.nn.LSTM(I, H, num_layers=2, proj_size=P, batch_first=True, bidirectional=bidirectional).double()
    m2.load_state_dict(interop.to_torch_lstm(layers))
    assert list(m2.state_dict()) == list(m.state_dict())
    np.testing.assert_allclose(m2(xt)[0].detach().numpy(), out.detach().numpy(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_modules_with_proj_size_equal_the_functional_stack(api):
    from flax import nnx

    import jaxlstm.linen as jl
    import jaxlstm.nnx as jn

    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float64)
    kw = dict(num_layers=2, bidirectional=True, proj_size=P, param_dtype=jnp.float64, learn_initial_state=True)
    if api == "linen":
        model = jl.LSTM(H, **kw)
        variables = model.init(jax.random.key(0), xs)
        ys, states = model.apply(variables, xs, return_state=True)
        layers, carry = model.layers(variables), model.initialize_carry(None, xs.shape)
        assert variables["params"]["initial_hidden"].shape == (2, 2, P)
    else:
        model = jn.LSTM(I, H, **kw, rngs=nnx.Rngs(0))
        ys, states = model(xs, return_state=True)
        layers, carry = model.layers, model.initialize_carry(xs.shape)
        assert model.initial_hidden[...].shape == (2, 2, P)
    assert ys.shape == (B, T, 2 * P) and layers[1].forward.input_size == 2 * P
    ref_ys, ref_states = jaxlstm.lstm_stack(layers, xs)  # the learned initial states start at zero
    np.testing.assert_array_equal(ys, ref_ys)
    assert jax.tree.structure(carry) == jax.tree.structure(states)
    assert [a.shape for a in jax.tree.leaves(carry)] == [a.shape for a in jax.tree.leaves(ref_states)]
