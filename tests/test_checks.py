"""Bad input fails at trace time with a message that says expected / received / fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm

P = jaxlstm.init_params(jax.random.key(0), 3, 4)
XS = jnp.zeros((2, 5, 3), jnp.float32)


def test_feature_size_mismatch():
    with pytest.raises(ValueError, match=r"has 7 features.*input_size = 3.*input_size=7"):
        jaxlstm.lstm(P, jnp.zeros((2, 5, 7), jnp.float32))
    with pytest.raises(ValueError, match="input_size = 3"):
        jaxlstm.lstm_step(P, jaxlstm.zero_state(P, (2,)), jnp.zeros((2, 2), jnp.float32))
    with pytest.raises(ValueError, match="input_size = 3"):
        jaxlstm.forget_gate(P, jnp.zeros(4, jnp.float32), jnp.zeros(5, jnp.float32))


@pytest.mark.parametrize("shape", [(5,), (1, 2, 5, 3), ()])
def test_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"xs must have shape \(B, T, I\).*received rank"):
        jaxlstm.lstm(P, jnp.zeros(shape, jnp.float32))


def test_wrong_rank_is_raised_under_jit():
    with pytest.raises(ValueError, match="received rank 4"):
        jax.jit(lambda x: jaxlstm.lstm(P, x)[0])(jnp.zeros((1, 2, 5, 3), jnp.float32))


@pytest.mark.parametrize(
    "cell_shape, match",
    [((3, 4), r"expected \(2, 4\)"), ((2, 5), r"hidden_size 4"), ((4,), "Nothing is broadcast")],
)
def test_state_shape_mismatch(cell_shape, match):
    bad = jaxlstm.LSTMState(jnp.zeros(cell_shape, jnp.float32), jnp.zeros(cell_shape, jnp.float32))
    with pytest.raises(ValueError, match=match):
        jaxlstm.lstm(P, XS, bad)


def test_state_not_a_pair():
    with pytest.raises(TypeError, match="LSTMState"):
        jaxlstm.lstm(P, XS, jnp.zeros((2, 4), jnp.float32))


@pytest.mark.parametrize("lengths", [jnp.array([5]), jnp.array([[5, 5]]), jnp.array(5)])
def test_seq_lengths_wrong_shape(lengths):
    with pytest.raises(ValueError, match=r"seq_lengths must have shape \(2,\)"):
        jaxlstm.lstm(P, XS, seq_lengths=lengths)


def test_seq_lengths_non_integer():
    with pytest.raises(TypeError, match="integer dtype; received float"):
        jaxlstm.lstm(P, XS, seq_lengths=jnp.array([5.0, 2.0], jnp.float32))


@pytest.mark.parametrize("lengths", [[6, 1], [-1, 2]])
def test_seq_lengths_out_of_range(lengths):
    with pytest.raises(ValueError, match=r"\[0, T\] = \[0, 5\]"):
        jaxlstm.lstm(P, XS, seq_lengths=np.array(lengths))


def test_dtype_errors():
    with pytest.raises(TypeError, match="xs must have a floating dtype; received int32"):
        jaxlstm.lstm(P, jnp.zeros((2, 5, 3), jnp.int32))
    with pytest.raises(TypeError, match=r"xs has dtype float64 but the params have dtype float32.*astype"):
        jaxlstm.lstm(P, jnp.zeros((2, 5, 3), jnp.float64))
    bad = jaxlstm.zero_state(P, (2,), dtype=jnp.float64)
    with pytest.raises(TypeError, match="state.cell has dtype float64"):
        jaxlstm.lstm(P, XS, bad)


def test_params_from_gates_inconsistent():
    H, I = 4, 3
    W = np.zeros((H, H + I), np.float32)
    b = np.zeros(H, np.float32)
    with pytest.raises(ValueError, match=r"W_f2 has shape \(4, 6\) but W_f1 has shape \(4, 7\)"):
        jaxlstm.params_from_gates(W, b, W, b, W[:, :6], b, W, b)
    with pytest.raises(ValueError, match=r"b_i has shape \(3,\); expected \(4,\)"):
        jaxlstm.params_from_gates(W, b, W, b[:3], W, b, W, b)
    with pytest.raises(ValueError, match="W_o was given but b_o was not"):
        jaxlstm.params_from_gates(W, b, W, b, W, b, W, b, W_o=np.eye(H, dtype=np.float32))
    with pytest.raises(ValueError, match="b_o was given but W_o was not"):
        jaxlstm.params_from_gates(W, b, W, b, W, b, W, b, b_o=b)
    with pytest.raises(ValueError, match=r"W_o has shape \(4, 3\); expected \(4, 4\)"):
        jaxlstm.params_from_gates(W, b, W, b, W, b, W, b, W_o=np.zeros((4, 3), np.float32), b_o=b)
    with pytest.raises(ValueError, match="no input features"):
        jaxlstm.params_from_gates(*([W[:, :4], b] * 4))
    with pytest.raises(TypeError, match="share one dtype"):
        jaxlstm.params_from_gates(W, b, W, b, W, b, W, b.astype(np.float64))


@pytest.mark.parametrize("hidden", [0, -3])
def test_hidden_size_must_be_positive(hidden):
    with pytest.raises(ValueError, match=f"hidden_size must be a positive int; received {hidden}"):
        jaxlstm.init_params(jax.random.key(0), 3, hidden)


def test_sizes_must_be_ints():
    with pytest.raises(TypeError, match="input_size must be a positive int"):
        jaxlstm.init_params(jax.random.key(0), 3.0, 4)
    with pytest.raises(TypeError, match="floating dtype"):
        jaxlstm.init_params(jax.random.key(0), 3, 4, dtype=jnp.int32)


def test_not_params():
    with pytest.raises(TypeError, match="expected jaxlstm.LSTMParams; received a dict"):
        jaxlstm.lstm({"w": 1}, XS)


def test_gate_shape_mismatch_not_broadcast():
    with pytest.raises(ValueError, match="Nothing is broadcast"):
        jaxlstm.input_gate(P, jnp.zeros(4, jnp.float32), jnp.zeros((2, 3), jnp.float32))


def test_bad_unroll_and_stack_arguments():
    with pytest.raises(ValueError, match="unroll must be a positive int"):
        jaxlstm.lstm(P, XS, unroll=0)
    with pytest.raises(ValueError, match="merge must be one of"):
        layer = jaxlstm.BidirectionalParams(P, P)
        jaxlstm.bidirectional(layer, XS, merge="max")
    with pytest.raises(ValueError, match="2 states for 1 layers"):
        jaxlstm.lstm_stack([P], XS, states=[None, None])
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        jaxlstm.init_stack(jax.random.key(0), 3, 4, num_layers=0)


def test_messages_describe_arrays_without_class_names_or_reprs():
    """An array where a state or params belong is named by shape and dtype, never 'ArrayImpl' or its values."""
    big = jnp.arange(4000.0, dtype=jnp.float32).reshape(40, 100)
    for call in (
        lambda: jaxlstm.lstm(P, XS, jnp.zeros((2, 4), jnp.float32)),
        lambda: jaxlstm.lstm(P._replace(w_x=big), XS),
        lambda: jaxlstm.lstm(big, XS),
    ):
        with pytest.raises((TypeError, ValueError)) as info:
            call()
        msg = str(info.value)
        assert "ArrayImpl" not in msg and "3999" not in msg and len(msg) < 400, msg
    with pytest.raises(TypeError, match=r"received an array of shape \(2, 4\) and dtype float32"):
        jaxlstm.lstm(P, XS, jnp.zeros((2, 4), jnp.float32))


@pytest.mark.slow  # many compilations: the slow tier (CI)
def test_stack_errors_name_the_layer_and_direction():
    layers = jaxlstm.init_stack(jax.random.key(0), 3, 4, num_layers=3)
    bad = (layers[0], layers[1], layers[2]._replace(w_x=layers[2].w_x[:3]))
    with pytest.raises(ValueError, match=r"^lstm_stack: layer 2: xs has 4 features"):
        jaxlstm.lstm_stack(bad, XS)
    bi = jaxlstm.init_stack(jax.random.key(0), 3, 4, num_layers=2, bidirectional=True)
    state = (None, jaxlstm.BidirectionalState(jaxlstm.zero_state(4, (2,)), jaxlstm.zero_state(4, (3,))))
    with pytest.raises(ValueError, match=r"^lstm_stack: layer 1: bidirectional: backward direction: state.cell"):
        jaxlstm.lstm_stack(bi, XS, state)


def test_bidirectional_hidden_sizes_must_match_for_elementwise_merges():
    p = jaxlstm.BidirectionalParams(
        jaxlstm.init_params(jax.random.key(0), 3, 4), jaxlstm.init_params(jax.random.key(1), 3, 5)
    )
    for merge in ("sum", "mean", "mul"):
        with pytest.raises(ValueError, match="forward hidden_size 4 and backward hidden_size 5"):
            jaxlstm.bidirectional(p, XS, merge=merge)
    ys, _ = jaxlstm.bidirectional(p, XS, merge="concat")  # well defined: 4 + 5 features
    assert ys.shape == (2, 5, 9)
