"""The character-LM job: its sampling filters against a NumPy reference, its training batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlstm.app.charlm import RunError, check_sampling, filter_logits, stream_batches, zero_carry


def reference(logits, temperature, top_k, top_p):
    z = np.asarray(logits, np.float64)
    z = (z - z.max()) / temperature  # logits up to a constant: the shift that changes no probability
    keep = np.ones_like(z, bool)
    order = np.argsort(-z)
    if top_k is not None:
        keep[order[top_k:]] = False
    p = np.exp(z - z.max())
    p /= p.sum()
    mass = 0.0
    for rank, i in enumerate(order):  # the smallest set of most likely tokens holding top_p
        if mass >= top_p:
            keep[order[rank:]] = False
            break
        mass += p[i]
    return np.where(keep, z, -np.inf)


@pytest.mark.parametrize("top_k,top_p", [(None, 1.0), (3, 1.0), (None, 0.5), (4, 0.8), (1, 1.0), (None, 1e-6)])
def test_filter_logits_matches_reference(top_k, top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=10) * 2
    got = np.asarray(filter_logits(jnp.asarray(logits), 0.7, top_k, top_p))
    np.testing.assert_allclose(got, reference(logits, 0.7, top_k, top_p), rtol=1e-12)
    kept = np.isfinite(got).sum()
    assert kept >= 1 and (top_k is None or kept <= top_k)


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 1e-8])
def test_a_tiny_temperature_gives_the_greedy_limit(temperature):
    """--temperature 1e-45 used to overflow the logits to NaN (the samples came out as newlines)."""
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 10)), jnp.float32)
    probs = jax.nn.softmax(filter_logits(logits, temperature), axis=-1)
    np.testing.assert_array_equal(np.asarray(probs), np.eye(10)[np.argmax(np.asarray(logits), -1)])


@pytest.mark.parametrize("temperature", [1e30, 1e300])
def test_a_huge_temperature_is_uniform_and_quiet(temperature):
    """--temperature 1e300 used to leak NumPy's overflow warning (warnings are errors in this suite)."""
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(2, 7)), jnp.float32)
    probs = jax.nn.softmax(filter_logits(logits, temperature), axis=-1)
    np.testing.assert_allclose(np.asarray(probs), np.full((2, 7), 1 / 7), rtol=1e-6)


@pytest.mark.parametrize(
    "args,match",
    [
        ((-1.0, None, 1.0, 1), "--temperature must be a finite number >= 0"),
        ((float("nan"), None, 1.0, 1), "--temperature"),
        ((1.0, 0, 1.0, 1), "--top-k must be a positive integer"),
        ((1.0, None, 0.0, 1), r"--top-p must lie in \(0, 1\]"),
        ((1.0, None, 1.0, 0), "--num-samples must be a positive integer"),
    ],
)
def test_sampling_options_are_checked(args, match):
    with pytest.raises(RunError, match=match):
        check_sampling(*args)


# ------------------------------------------------------------------ training batches


@pytest.mark.parametrize("n, batch, seq", [(1000, 4, 16), (997, 3, 7), (40, 8, 16)])
def test_stream_batches_continue_each_row_where_the_last_step_stopped(n, batch, seq):
    tokens = np.arange(n, dtype=np.int32)  # a token's value is its position
    batches = stream_batches(tokens, batch, seq, seed=0)
    arc = n // batch
    per_epoch = max(1, arc // seq)
    steps = [np.asarray(batches(s)) for s in range(2 * per_epoch + 1)]
    for s, b in enumerate(steps):
        assert b.shape == (batch, seq + 1) and b.dtype == np.int32
        np.testing.assert_array_equal(np.diff(b, axis=1) % n, 1)  # contiguous text (the ring wraps at n)
        if (s + 1) % per_epoch and s + 1 < len(steps):  # within an epoch: the next row starts at this one's end
            np.testing.assert_array_equal(steps[s + 1][:, 0], b[:, -1])
    if arc >= seq:  # one epoch reads each token as an input at most once, per_epoch * seq of each arc
        inputs = np.concatenate([b[:, :-1].ravel() for b in steps[:per_epoch]])
        assert len(np.unique(inputs)) == inputs.size == batch * per_epoch * seq
    # a new epoch starts the arcs elsewhere, and the batches are a pure function of the step
    assert not np.array_equal(steps[per_epoch][:, 0], steps[0][:, 0])
    again = stream_batches(tokens, batch, seq, seed=0)
    np.testing.assert_array_equal(np.asarray(again(per_epoch + 1)), steps[per_epoch + 1])


def test_a_carried_state_reads_consecutive_batches_as_one_text():
    """Step s from zeros, then step s + 1 from the state it left, gives the logits of the two rows read as one."""
    import jax

    from jaxlstm.linen import CharLM

    tokens = np.asarray(np.random.default_rng(0).integers(0, 11, 600), np.int32)
    batches = stream_batches(tokens, 3, 20, seed=5)
    model = CharLM(vocab_size=11, embed_dim=4, hidden_size=8)
    params = model.init(jax.random.key(0), jnp.zeros((1, 20), jnp.int32))["params"]
    first, second = batches(3), batches(4)
    carry = zero_carry(model, params, 3, 20)
    logits1, carry = model.apply({"params": params}, first[:, :-1], carry, return_state=True)
    logits2 = model.apply({"params": params}, second[:, :-1], carry)
    whole = model.apply({"params": params}, jnp.concatenate([first[:, :-1], second[:, :-1]], axis=1))
    np.testing.assert_allclose(np.concatenate([logits1, logits2], axis=1), whole, rtol=1e-5, atol=1e-6)
