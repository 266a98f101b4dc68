"""Stacks and bidirectional layers against composing single layers by hand / the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm
from tests.helpers.reference import random_gates, run_batch


def test_bidirectional_against_reference_with_lengths():
    rng = np.random.default_rng(0)
    gf, gb = random_gates(rng, 3, 4), random_gates(rng, 3, 4, seed_cell=False)
    p = jaxlstm.BidirectionalParams(jaxlstm.params_from_gates(**gf), jaxlstm.params_from_gates(**gb))
    xs = rng.normal(size=(3, 6, 3))
    lengths = np.array([6, 3, 0])
    z = np.zeros((3, 4))
    ys, state = jaxlstm.bidirectional(p, xs, seq_lengths=jnp.asarray(lengths))
    of, cf, af = run_batch(gf, xs, z, z, lengths)
    ob, cb, ab = run_batch(gb, xs, z, z, lengths, reverse=True)
    np.testing.assert_allclose(ys, np.concatenate([of, ob], axis=-1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state.forward.hidden, af, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state.backward.cell, cb, rtol=1e-12, atol=1e-12)
    # the padding of sequence 1 never reaches the backward direction: changing it changes nothing
    xs2 = xs.copy()
    xs2[1, 3:] = 100.0
    ys2, _ = jaxlstm.bidirectional(p, xs2, seq_lengths=jnp.asarray(lengths))
    np.testing.assert_array_equal(ys2, ys)


@pytest.mark.parametrize("merge", ["sum", "mean", "mul", lambda f, b: f - b])
def test_bidirectional_merges(merge):
    layers = jaxlstm.init_stack(jax.random.key(0), 3, 4, bidirectional=True, dtype=jnp.float64)
    p = layers[0]
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3), jnp.float64)
    yf, _ = jaxlstm.lstm(p.forward, xs)
    yb, _ = jaxlstm.lstm(p.backward, xs, reverse=True)
    ys, _ = jaxlstm.bidirectional(p, xs, merge=merge)
    expected = {"sum": yf + yb, "mean": (yf + yb) / 2, "mul": yf * yb}.get(merge) if isinstance(merge, str) else yf - yb
    np.testing.assert_allclose(ys, expected, rtol=1e-14)


@pytest.mark.parametrize("bidir", [False, True])
def test_stack_equals_composing_layers_by_hand(bidir):
    key = jax.random.key(2)
    layers = jaxlstm.init_stack(key, 3, 4, num_layers=3, bidirectional=bidir, dtype=jnp.float64)
    xs = jax.random.normal(jax.random.key(3), (2, 6, 3), jnp.float64)
    lengths = jnp.array([6, 4])
    rng = np.random.default_rng(0)

    def rand_state():
        return jaxlstm.LSTMState(jnp.asarray(rng.normal(size=(2, 4))), jnp.asarray(rng.normal(size=(2, 4))))

    states = [jaxlstm.BidirectionalState(rand_state(), rand_state()) if bidir else rand_state() for _ in layers]
    ys, finals = jaxlstm.lstm_stack(layers, xs, states, seq_lengths=lengths)
    h = xs
    for layer, s, fin in zip(layers, states, finals):
        if bidir:
            yf, sf = jaxlstm.lstm(layer.forward, h, s.forward, seq_lengths=lengths)
            yb, sb = jaxlstm.lstm(layer.backward, h, s.backward, seq_lengths=lengths, reverse=True)
            h = jnp.concatenate([yf, yb], -1)
            np.testing.assert_allclose(fin.backward.cell, sb.cell, rtol=1e-14)
        else:
            h, sf = jaxlstm.lstm(layer, h, s, seq_lengths=lengths)
            np.testing.assert_allclose(fin.hidden, sf.hidden, rtol=1e-14)
    np.testing.assert_allclose(ys, h, rtol=1e-14)
    assert ys.shape == (2, 6, 8 if bidir else 4)
    np.testing.assert_array_equal(ys[1, 4:], 0.0)


@pytest.mark.slow  # many compilations: the slow tier (CI)
def test_stack_dropout_between_layers():
    layers = jaxlstm.init_stack(jax.random.key(0), 3, 16, num_layers=2)
    xs = jax.random.normal(jax.random.key(1), (4, 5, 3), jnp.float32)
    plain, _ = jaxlstm.lstm_stack(layers, xs)
    no_key, _ = jaxlstm.lstm_stack(layers, xs, dropout_rate=0.5)
    np.testing.assert_array_equal(no_key, plain)
    d1, _ = jaxlstm.lstm_stack(layers, xs, dropout_rate=0.5, dropout_key=jax.random.key(2))
    d2, _ = jaxlstm.lstm_stack(layers, xs, dropout_rate=0.5, dropout_key=jax.random.key(3))
    assert not np.allclose(d1, plain) and not np.allclose(d1, d2)
    # layer 2 given the dropped-out layer-1 output by hand
    h1, _ = jaxlstm.lstm(layers[0], xs)
    keys = jax.random.split(jax.random.key(2), 2)
    keep = jax.random.bernoulli(jax.random.split(keys[0], 3)[0], 0.5, h1.shape)
    manual, _ = jaxlstm.lstm(layers[1], jnp.where(keep, h1 * 2.0, 0.0))
    np.testing.assert_allclose(d1, manual, rtol=1e-6, atol=1e-7)


def test_stack_under_jit_and_grad():
    layers = jaxlstm.init_stack(jax.random.key(0), 3, 4, num_layers=2, bidirectional=True)
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3), jnp.float32)
    loss = jax.jit(lambda ls: jnp.sum(jaxlstm.lstm_stack(ls, xs, seq_lengths=jnp.array([5, 2]))[0] ** 2))
    grads = jax.grad(loss)(layers)
    assert jax.tree.structure(grads) == jax.tree.structure(layers)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


@pytest.mark.slow  # many compilations: the slow tier (CI)
def test_stack_recurrent_dropout_is_one_mask_per_sequence():
    layers = jaxlstm.init_stack(jax.random.key(0), 3, 8, num_layers=1, bidirectional=True, dtype=jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (4, 6, 3), jnp.float64)
    key = jax.random.key(5)
    ys, _ = jaxlstm.lstm_stack(layers, xs, recurrent_dropout_rate=0.25, dropout_key=key)
    # rebuild the masks the documented way and run each direction by hand
    _, k_fwd, k_bwd = jax.random.split(jax.random.split(key, 1)[0], 3)
    masks = [jnp.where(jax.random.bernoulli(k, 0.75, (4, 8)), 1 / 0.75, 0.0) for k in (k_fwd, k_bwd)]
    yf, _ = jaxlstm.lstm(layers[0].forward, xs, recurrent_mask=masks[0])
    yb, _ = jaxlstm.lstm(layers[0].backward, xs, reverse=True, recurrent_mask=masks[1])
    np.testing.assert_allclose(ys, jnp.concatenate([yf, yb], -1), rtol=1e-13)
    plain, _ = jaxlstm.lstm_stack(layers, xs)
    assert not np.allclose(ys, plain)
    assert len({tuple(np.asarray(m[b])) for m in masks[:1] for b in range(4)}) > 1  # masks differ across sequences


def test_bidirectional_and_stack_with_mask_against_reference():
    rng = np.random.default_rng(5)
    gf, gb = random_gates(rng, 3, 4), random_gates(rng, 3, 4, seed_cell=False)
    p = jaxlstm.BidirectionalParams(jaxlstm.params_from_gates(**gf), jaxlstm.params_from_gates(**gb))
    xs = rng.normal(size=(3, 6, 3))
    valid = np.array([[0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
    z = np.zeros((3, 4))
    ys, state = jaxlstm.bidirectional(p, xs, mask=jnp.asarray(valid))
    of, _, af = run_batch(gf, xs, z, z, valid=valid)
    ob, cb, _ = run_batch(gb, xs, z, z, reverse=True, valid=valid)  # the valid steps, last to first
    np.testing.assert_allclose(ys, np.concatenate([of, ob], axis=-1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state.forward.hidden, af, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state.backward.cell, cb, rtol=1e-12, atol=1e-12)
    # in a stack the mask applies in every layer: equal to running the layers one by one with it
    layers = (p, jaxlstm.params_from_gates(**random_gates(rng, 8, 2)))
    ys2, finals = jaxlstm.lstm_stack(layers, xs, mask=jnp.asarray(valid))
    y1, _ = jaxlstm.bidirectional(p, xs, mask=jnp.asarray(valid))
    y2, f2 = jaxlstm.lstm(layers[1], y1, mask=jnp.asarray(valid))
    np.testing.assert_array_equal(ys2, y2)
    np.testing.assert_array_equal(finals[1].hidden, f2.hidden)
    np.testing.assert_array_equal(np.asarray(ys2)[~valid], 0.0)


def test_merge_none_returns_both_directions_and_a_merge_may_return_a_pytree():
    layers = jaxlstm.init_stack(jax.random.key(0), 3, 4, num_layers=2, bidirectional=True, dtype=jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3), jnp.float64)
    p = layers[0]
    yf, _ = jaxlstm.lstm(p.forward, xs)
    yb, _ = jaxlstm.lstm(p.backward, xs, reverse=True)
    (f, b), _ = jaxlstm.bidirectional(p, xs, merge=None)
    np.testing.assert_array_equal(f, yf)
    np.testing.assert_array_equal(b, yb)
    out, _ = jaxlstm.bidirectional(p, xs, merge=lambda f, b: {"last": f[:, -1], "first": b[:, 0]})
    np.testing.assert_array_equal(out["first"], yb[:, 0])
    # in a stack: fine on the last layer, a clear error before another layer
    ys, _ = jaxlstm.lstm_stack(layers[:1], xs, merge=None)
    np.testing.assert_array_equal(ys[1], yb)
    with pytest.raises(ValueError, match=r"layer 0: merge=None gave a tuple of 2 items, but layer 1 needs one array"):
        jaxlstm.lstm_stack(layers, xs, merge=None)


@pytest.mark.parametrize(
    "merge, received",
    [(lambda f, b: jnp.sum(f + b), r"\(\)"), (lambda f, b: (f + b).mean(1), r"\(2, 4\)")],
    ids=["scalar", "over-time"],
)
def test_a_merge_that_drops_batch_or_time_cannot_feed_another_layer(merge, received):
    """One array, but not one row of features per step: the next layer would get a wrong input."""
    layers = jaxlstm.init_stack(jax.random.key(0), 3, 4, num_layers=2, bidirectional=True, dtype=jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3), jnp.float64)
    with pytest.raises(ValueError, match=r"layer 0: the merge gave an array of shape " + received + r".*\(2, 5, F\)"):
        jaxlstm.lstm_stack(layers, xs, merge=merge)
    # the last layer may reduce as it likes
    out, _ = jaxlstm.lstm_stack(layers[:1], xs, merge=merge)
    assert out.shape == jax.eval_shape(merge, xs[..., :1].repeat(4, -1), xs[..., :1].repeat(4, -1)).shape
