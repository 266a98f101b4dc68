"""Weight exchange with peers, proven by running both sides on the same input."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm
from jaxlstm import interop

B, T, I, H = 3, 7, 4, 5
F32 = dict(rtol=1e-5, atol=1e-6)
F64 = dict(rtol=1e-10, atol=1e-12)


def rand(shape, dtype, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def assert_bitwise(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def classic(seed=0, dtype=jnp.float32, i=I, h=H):
    p = jaxlstm.init_params(jax.random.key(seed), i, h, output_transform=False, dtype=dtype)
    # random biases too, so that bias handling is exercised
    return p._replace(b=jnp.asarray(rand(p.b.shape, np.dtype(dtype), seed + 100)))


# ------------------------------------------------------------------ seed-cell export rules


def test_seed_cell_export_is_refused_unless_identity():
    p = jaxlstm.init_params(jax.random.key(0), I, H)  # W_o = I, b_o = 0 at init
    assert interop.as_classic(p).w_o is None
    interop.to_keras(p)  # exports: it is exactly the classic cell
    trained = p._replace(w_o=p.w_o * 1.01)
    for export in (interop.to_keras, interop.to_flax_linen, interop.to_haiku, interop.to_equinox):
        with pytest.raises(ValueError, match="learned output map"):
            export(trained)


def test_state_order_helpers():
    s = jaxlstm.LSTMState(jnp.ones(3), jnp.zeros(3))
    h, c = interop.state_to_hc(s)
    np.testing.assert_array_equal(h, 0)
    assert_bitwise(interop.state_from_hc((h, c)), s)


# ------------------------------------------------------------------ PyTorch


@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("dtype,batch_first", [("float32", True), ("float64", False)])
def test_torch_lstm_parity(torch, dtype, num_layers, bidirectional, batch_first):
    torch.manual_seed(0)
    tdt = getattr(torch, dtype)
    m = torch.nn.LSTM(I, H, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first).to(tdt)
    d = 2 if bidirectional else 1
    x = rand((B, T, I) if batch_first else (T, B, I), dtype, 1)
    h0 = rand((num_layers * d, B, H), dtype, 2)
    c0 = rand((num_layers * d, B, H), dtype, 3)
    xt = torch.tensor(x, requires_grad=True)
    out, (hn, cn) = m(xt, (torch.tensor(h0), torch.tensor(c0)))
    (out**2).sum().backward()

    layers = interop.from_torch_lstm(m)
    states = interop.torch_states_to_jax(h0, c0, num_layers, bidirectional)
    loss = lambda xs: jaxlstm.lstm_stack(layers, xs, states, time_major=not batch_first)
    ys, finals = loss(jnp.asarray(x))
    tol = F64 if dtype == "float64" else F32
    np.testing.assert_allclose(ys, out.detach().numpy(), **tol)
    hn_j, cn_j = interop.jax_states_to_torch(finals)
    np.testing.assert_allclose(hn_j.numpy(), hn.detach().numpy(), **tol)
    np.testing.assert_allclose(cn_j.numpy(), cn.detach().numpy(), **tol)
    gx = jax.grad(lambda xs: jnp.sum(loss(xs)[0] ** 2))(jnp.asarray(x))
    np.testing.assert_allclose(gx, xt.grad.numpy(), **tol)
    # round trip jaxlstm -> torch -> jaxlstm is bitwise
    sd = interop.to_torch_lstm(layers)
    m2 = torch.nn.LSTM(I, H, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first).to(tdt)
    m2.load_state_dict(sd)
    assert_bitwise(interop.from_torch_lstm(m2), layers)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_torch_packed_sequence_matches_seq_lengths(torch, bidirectional):
    torch.manual_seed(1)
    m = torch.nn.LSTM(I, H, num_layers=2, bidirectional=bidirectional, batch_first=True).double()
    lengths = [7, 4, 1]
    x = rand((B, T, I), "float64", 4)
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.tensor(x), lengths, batch_first=True, enforce_sorted=False)
    out_p, (hn, cn) = m(packed)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out_p, batch_first=True, total_length=T)
    layers = interop.from_torch_lstm(m)
    ys, finals = jaxlstm.lstm_stack(layers, jnp.asarray(x), seq_lengths=jnp.asarray(lengths))
    np.testing.assert_allclose(ys, out.detach().numpy(), **F64)  # padding is zero on both sides
    hn_j, cn_j = interop.jax_states_to_torch(finals)
    np.testing.assert_allclose(hn_j.numpy(), hn.detach().numpy(), **F64)
    np.testing.assert_allclose(cn_j.numpy(), cn.detach().numpy(), **F64)


def test_torch_cell_and_bias_false(torch):
    torch.manual_seed(2)
    cell = torch.nn.LSTMCell(I, H).double()
    x, h0, c0 = rand((B, I), "float64", 5), rand((B, H), "float64", 6), rand((B, H), "float64", 7)
    h1, c1 = cell(torch.tensor(x), (torch.tensor(h0), torch.tensor(c0)))
    p = interop.from_torch_cell(cell)
    state, y = jaxlstm.lstm_step(p, jaxlstm.LSTMState(jnp.asarray(c0), jnp.asarray(h0)), jnp.asarray(x))
    np.testing.assert_allclose(y, h1.detach().numpy(), **F64)
    np.testing.assert_allclose(state.cell, c1.detach().numpy(), **F64)
    assert_bitwise(interop.from_torch_cell(interop.to_torch_cell(p)), p)

    nb = torch.nn.LSTM(I, H, bias=False).double()
    layers = interop.from_torch_lstm(nb)
    np.testing.assert_array_equal(layers[0].b, 0)
    nb2 = torch.nn.LSTM(I, H, bias=False).double()
    nb2.load_state_dict(interop.to_torch_lstm(layers, bias=False))
    with pytest.raises(ValueError, match="non-zero biases"):
        interop.to_torch_lstm((classic(dtype=jnp.float64),), bias=False)


# ------------------------------------------------------------------ Keras 3


@pytest.mark.slow  # trains or runs a peer: the slow tier (CI)
def test_keras_parity_and_round_trip(peer_promotion):
    keras = pytest.importorskip("keras", reason="Keras not installed")
    layer = keras.layers.LSTM(H, return_sequences=True, return_state=True)
    x = rand((B, T, I), "float32", 8)
    h0, c0 = rand((B, H), "float32", 9), rand((B, H), "float32", 10)
    layer(x)  # build
    rng = np.random.default_rng(11)
    layer.set_weights([rng.normal(size=tuple(w.shape)).astype("float32") * 0.5 for w in layer.weights])
    out, hn, cn = layer(x, initial_state=[h0, c0])
    p = interop.from_keras(layer)
    ys, final = jaxlstm.lstm(p, jnp.asarray(x), interop.state_from_hc((h0, c0)))
    np.testing.assert_allclose(ys, np.asarray(out), **F32)
    np.testing.assert_allclose(final.hidden, np.asarray(hn), **F32)
    np.testing.assert_allclose(final.cell, np.asarray(cn), **F32)
    mine = classic()
    layer.set_weights(interop.to_keras(mine))
    assert_bitwise(interop.from_keras(layer), mine)


# ------------------------------------------------------------------ Flax


@pytest.mark.parametrize("cell_name", ["LSTMCell", "OptimizedLSTMCell"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_flax_linen_parity(cell_name, dtype, peer_promotion):
    import flax.linen as nn

    cell = getattr(nn, cell_name)(H, param_dtype=dtype)
    rnn = nn.RNN(cell, return_carry=True)
    x = jnp.asarray(rand((B, T, I), np.dtype(dtype), 12))
    c0, h0 = (jnp.asarray(rand((B, H), np.dtype(dtype), s)) for s in (13, 14))
    variables = rnn.init(jax.random.key(0), x)
    variables = jax.tree.map(lambda a: a + jnp.asarray(rand(a.shape, np.dtype(dtype), 15) * 0.1), variables)
    (c, h), ys_flax = rnn.apply(variables, x, initial_carry=(c0, h0))
    p = interop.from_flax_linen(variables["params"]["cell"])
    ys, final = jaxlstm.lstm(p, x, jaxlstm.LSTMState(c0, h0))
    tol = F64 if dtype == jnp.float64 else F32
    np.testing.assert_allclose(ys, ys_flax, **tol)
    np.testing.assert_allclose(final.cell, c, **tol)
    back = interop.to_flax_linen(p)
    assert_bitwise(back, dict(variables["params"]["cell"]))
    mine = classic(dtype=dtype)
    assert_bitwise(interop.from_flax_linen(interop.to_flax_linen(mine)), mine)


@pytest.mark.parametrize("cell_name", ["LSTMCell", "OptimizedLSTMCell"])
def test_flax_nnx_parity(cell_name, peer_promotion):
    from flax import nnx

    cell = getattr(nnx, cell_name)(I, H, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    mine = classic(dtype=jnp.float64)
    interop.to_flax_nnx(mine, cell)  # write our weights into the NNX cell
    x = jnp.asarray(rand((B, T, I), "float64", 16))
    c0, h0 = (jnp.asarray(rand((B, H), "float64", s)) for s in (17, 18))
    (c, h), ys_nnx = nnx.RNN(cell, return_carry=True)(x, initial_carry=(c0, h0))
    ys, final = jaxlstm.lstm(mine, x, jaxlstm.LSTMState(c0, h0))
    np.testing.assert_allclose(ys, ys_nnx, **F64)
    np.testing.assert_allclose(final.hidden, h, **F64)
    assert_bitwise(interop.from_flax_nnx(cell), mine)
    # the pure-dict form reads back the same
    assert_bitwise(interop.from_flax_nnx(nnx.to_pure_dict(nnx.state(cell, nnx.Param))), mine)


@pytest.mark.parametrize("change", [{"activation_fn": "relu"}, {"gate_fn": "hard_sigmoid"}])
def test_flax_nnx_cells_with_other_activations_are_refused(change):
    """from_flax_nnx used to convert an nnx.LSTMCell(activation_fn=relu) as if it were tanh (1.65 off)."""
    from flax import nnx

    kw = {k: getattr(jax.nn, v) for k, v in change.items()}
    cell = nnx.LSTMCell(I, H, rngs=nnx.Rngs(0), **kw)
    with pytest.raises(
        ValueError,
        match=f"from_flax_nnx: only cells with gate_fn=sigmoid and activation_fn=tanh.*{list(change.values())[0]}",
    ):
        interop.from_flax_nnx(cell)


# ------------------------------------------------------------------ Equinox


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_equinox_parity(dtype, peer_promotion):
    eqx = pytest.importorskip("equinox", reason="Equinox not installed")
    cell = eqx.nn.LSTMCell(I, H, dtype=dtype, key=jax.random.key(3))
    x = jnp.asarray(rand((T, I), np.dtype(dtype), 19))
    h0, c0 = (jnp.asarray(rand((H,), np.dtype(dtype), s)) for s in (20, 21))

    def step(carry, xt):
        carry = cell(xt, carry)
        return carry, carry[0]

    (h, c), ys_eqx = jax.lax.scan(step, (h0, c0), x)
    p = interop.from_equinox(cell)
    ys, final = jaxlstm.lstm(p, x, interop.state_from_hc((h0, c0)))
    tol = F64 if dtype == jnp.float64 else F32
    np.testing.assert_allclose(ys, ys_eqx, **tol)
    np.testing.assert_allclose(final.cell, c, **tol)
    mine = classic(dtype=dtype)
    assert_bitwise(interop.from_equinox(interop.to_equinox(mine)), mine)
    assert_bitwise(interop.from_equinox(interop.to_equinox(mine, cell)), mine)


# ------------------------------------------------------------------ Haiku


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_haiku_parity(dtype, peer_promotion):
    hk = pytest.importorskip("haiku", reason="Haiku not installed")

    def f(x, h0, c0):
        core = hk.LSTM(H)
        return hk.dynamic_unroll(core, x, hk.LSTMState(h0, c0), time_major=False)

    fn = hk.without_apply_rng(hk.transform(f))
    x = jnp.asarray(rand((B, T, I), np.dtype(dtype), 22))
    h0, c0 = (jnp.asarray(rand((B, H), np.dtype(dtype), s)) for s in (23, 24))
    params = fn.init(jax.random.key(0), x, h0, c0)
    params = jax.tree.map(lambda a: a + jnp.asarray(rand(a.shape, np.dtype(dtype), 25) * 0.1), params)
    ys_hk, state = fn.apply(params, x, h0, c0)
    p = interop.from_haiku(params)
    ys, final = jaxlstm.lstm(p, x, interop.state_from_hc((h0, c0)))
    tol = F64 if dtype == jnp.float64 else F32
    np.testing.assert_allclose(ys, ys_hk, **tol)
    np.testing.assert_allclose(final.cell, state.cell, **tol)
    # Haiku stores the forget bias minus one: the round trip is exact except for that rounding
    mine = classic(dtype=dtype)
    back = interop.from_haiku(interop.to_haiku(mine))
    assert_bitwise(back._replace(b=None), mine._replace(b=None))
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(back.b, mine.b, rtol=0, atol=2 * eps)
    np.testing.assert_array_equal(back.b[H:], mine.b[H:])


# ------------------------------------------------------------------ converters check every key and shape


def torch_like_state_dict(num_layers=2, bidirectional=False, i=I, h=H):
    """A torch.nn.LSTM state_dict built with NumPy (the checks need no PyTorch)."""
    sd = {}
    for k in range(num_layers):
        size = i if k == 0 else h * (2 if bidirectional else 1)
        for d in ("", "_reverse") if bidirectional else ("",):
            sd[f"weight_ih_l{k}{d}"] = rand((4 * h, size), np.float32, k)
            sd[f"weight_hh_l{k}{d}"] = rand((4 * h, h), np.float32, k + 1)
            sd[f"bias_ih_l{k}{d}"] = rand((4 * h,), np.float32, k + 2)
            sd[f"bias_hh_l{k}{d}"] = rand((4 * h,), np.float32, k + 3)
    return sd


def test_torch_state_dict_is_checked_key_by_key():
    good = torch_like_state_dict(bidirectional=True)
    assert len(interop.from_torch_lstm(good)) == 2
    cases = {
        "lacks \\['weight_ih_l1'\\]": lambda sd: sd.pop("weight_ih_l1"),
        "lacks \\['bias_hh_l0_reverse'\\]": lambda sd: sd.pop("bias_hh_l0_reverse"),
        r"bias_ih_l0 has shape \(1,\); expected \(20,\)": lambda sd: sd.update(bias_ih_l0=np.zeros(1, np.float32)),
        r"weight_ih_l1 has shape \(20, 5\); expected \(20, 10\)": lambda sd: sd.update(
            weight_ih_l1=np.zeros((20, 5), np.float32)
        ),
        "unexpected keys \\['fc.weight'\\]": lambda sd: sd.update({"fc.weight": np.zeros(2)}),
    }
    for match, mutate in cases.items():
        sd = dict(good)
        mutate(sd)
        with pytest.raises(ValueError, match=match):
            interop.from_torch_lstm(sd)
    with pytest.raises(ValueError, match="the state_dict is empty"):
        interop.from_torch_lstm({})
    sd = {k: v for k, v in good.items() if "_l1" not in k}  # a whole layer missing in the middle is caught too
    sd.update({k.replace("_l0", "_l2"): v for k, v in sd.items() if "_l0" in k})
    with pytest.raises(ValueError, match="describes 3 layer"):
        interop.from_torch_lstm(sd)


def test_dict_converters_name_missing_entries_and_refuse_odd_shapes():
    p = classic()
    with pytest.raises(ValueError, match="from_flax_linen: no 'kernel' under ii"):
        interop.from_flax_linen({**interop.to_flax_linen(p), "ii": {}})
    with pytest.raises(ValueError, match="from_haiku: no 'b'"):
        interop.from_haiku({"lstm/linear": {"w": np.zeros((I + H, 4 * H))}})
    kernel, recurrent, bias = interop.to_keras(p)
    with pytest.raises(ValueError, match=r"from_keras bias: expected an array with 4H entries.*\(1,\)"):
        interop.from_keras([kernel, recurrent, np.zeros(1, np.float32)])
    with pytest.raises(ValueError, match="from_keras: the .* block of gate .* Nothing is broadcast"):
        interop.from_keras([kernel, recurrent[:, :-4], bias])


@pytest.mark.slow  # many compilations: the slow tier (CI)
def test_writing_into_a_cell_of_another_size_is_refused(peer_promotion):
    import equinox as eqx
    from flax import nnx

    p = classic()  # I = 4, H = 5
    for cell in (nnx.LSTMCell(I, 8, rngs=nnx.Rngs(0)), nnx.OptimizedLSTMCell(I, 8, rngs=nnx.Rngs(0))):
        with pytest.raises(ValueError, match="to_flax_nnx: the cell's .* has shape"):
            interop.to_flax_nnx(p, cell)
    with pytest.raises(ValueError, match=r"to_equinox: the cell's weight_ih has shape \(32, 4\)"):
        interop.to_equinox(p, eqx.nn.LSTMCell(I, 8, key=jax.random.key(0)))


@pytest.mark.slow  # trains or runs a peer: the slow tier (CI)
@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "rev"])
def test_keras_parity_with_mask(go_backwards, peer_promotion):
    keras = pytest.importorskip("keras", reason="Keras not installed")
    layer = keras.layers.LSTM(H, return_sequences=True, return_state=True, go_backwards=go_backwards)
    x = rand((B, T, I), "float32", 14)
    rng = np.random.default_rng(15)
    valid = rng.random((B, T)) < 0.6
    valid[0] = np.arange(T) >= T // 2  # left padding
    valid[1] = np.arange(T) < T // 2  # right padding
    layer(x)
    layer.set_weights([rng.normal(size=tuple(w.shape)).astype("float32") * 0.5 for w in layer.weights])
    out, hn, cn = layer(x, mask=valid)
    if go_backwards:  # refused unless the caller says it will run the params in reverse
        with pytest.raises(ValueError, match="go_backwards=True.*reverse=True"):
            interop.from_keras(layer)
    p = interop.from_keras(layer, go_backwards_ok=go_backwards)
    ys, final = jaxlstm.lstm(p, jnp.asarray(x), mask=jnp.asarray(valid), reverse=go_backwards)
    out = np.asarray(out)
    if go_backwards:  # Keras returns the outputs in processing order
        out = out[:, ::-1]
    np.testing.assert_allclose(np.asarray(ys)[valid], out[valid], **F32)  # Keras repeats an output at masked steps
    np.testing.assert_allclose(final.hidden, np.asarray(hn), **F32)
    np.testing.assert_allclose(final.cell, np.asarray(cn), **F32)


@pytest.mark.slow  # trains or runs a peer: the slow tier (CI)
@pytest.mark.parametrize("merge_mode", ["concat", "ave"])
def test_keras_bidirectional_parity_and_round_trip(merge_mode, peer_promotion):
    keras = pytest.importorskip("keras", reason="Keras not installed")
    layer = keras.layers.Bidirectional(keras.layers.LSTM(H, return_sequences=True), merge_mode=merge_mode)
    x = rand((B, T, I), "float32", 16)
    valid = np.ones((B, T), bool)
    valid[1, 4:] = False  # right padding
    valid[2, :3] = False  # left padding
    layer(x)
    rng = np.random.default_rng(17)
    layer.set_weights([rng.normal(size=tuple(w.shape)).astype("float32") * 0.5 for w in layer.weights])
    out = np.asarray(layer(x, mask=valid))
    p = interop.from_keras_bidirectional(layer)
    ys, _ = jaxlstm.bidirectional(p, jnp.asarray(x), mask=jnp.asarray(valid), merge=interop.KERAS_MERGE[merge_mode])
    np.testing.assert_allclose(np.asarray(ys)[valid], out[valid], **F32)
    mine = jaxlstm.BidirectionalParams(classic(), classic(seed=1))
    layer.set_weights(interop.to_keras_bidirectional(mine))
    assert_bitwise(interop.from_keras_bidirectional(layer), mine)
    assert_bitwise(interop.from_keras_bidirectional(interop.to_keras_bidirectional(mine)), mine)


def test_torch_converters_name_what_they_received():
    """from_torch_lstm(None) was an AttributeError about 'items'; state_from_hc((x,)) an unpacking error."""
    with pytest.raises(
        TypeError, match=r"expected a torch.nn.LSTM \(or LSTMCell\) or its state_dict\(\); received None"
    ):
        interop.from_torch_lstm(None)
    with pytest.raises(ValueError, match=r"state_from_hc expects the pair \(hidden, cell\).*1 items"):
        interop.state_from_hc((jnp.ones((1, 2, 3)),))
    s = interop.state_from_hc((jnp.ones((2, 3)), jnp.zeros((2, 3))))
    assert float(s.cell.sum()) == 0.0 and float(s.hidden.sum()) == 6.0


@pytest.mark.slow  # runs a peer: the slow tier (CI)
def test_keras_converters_refuse_an_unbuilt_or_a_plain_layer_in_words(peer_promotion):
    keras = pytest.importorskip("keras", reason="Keras not installed")
    with pytest.raises(ValueError, match="not built yet"):
        interop.from_keras(keras.layers.LSTM(4))
    layer = keras.layers.LSTM(4)
    layer.build((None, 5, 3))
    with pytest.raises(TypeError, match="expects a keras.layers.Bidirectional.*received a LSTM layer.*from_keras"):
        interop.from_keras_bidirectional(layer)
    assert interop.from_keras(layer).hidden_size == 4
