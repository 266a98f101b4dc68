"""An independent NumPy float64 rendering of the seed's LSTM equations.

Written from the formulas in SEED-lstm.md, not from the library: per-gate
matrices ``W`` of shape ``(H, H + I)`` acting on the column ``[a; x]``, a
plain Python loop over time and over the batch.
"""

import numpy as np


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def random_gates(rng, input_size, hidden_size, *, seed_cell=True, scale=0.5, proj_size=None):
    """Per-gate weights in the seed's notation, float64 (with ``proj_size``: ``W_hr`` (P, H), LSTMP)."""
    h, i = hidden_size, input_size
    p = h if proj_size is None else proj_size
    g = {}
    for name in ("f1", "i", "f2", "f3"):
        g[f"W_{name}"] = rng.normal(0.0, scale, (h, p + i))
        g[f"b_{name}"] = rng.normal(0.0, scale, (h,))
    if seed_cell:
        g["W_o"] = rng.normal(0.0, scale, (h, h))
        g["b_o"] = rng.normal(0.0, scale, (h,))
    else:
        g["W_o"] = g["b_o"] = None
    g["W_hr"] = None if proj_size is None else rng.normal(0.0, scale, (p, h))
    return g


def gate_values(g, a_prev, x, c_prev):
    """All gate values of one step for one sequence (1-D vectors)."""
    ax = np.concatenate([a_prev, x])
    gamma_f1 = sigmoid(g["W_f1"] @ ax + g["b_f1"])
    gamma_i = np.tanh(g["W_i"] @ ax + g["b_i"]) * sigmoid(g["W_f2"] @ ax + g["b_f2"])
    c = gamma_f1 * c_prev + gamma_i
    if g["W_o"] is None:
        first = np.tanh(c)
    else:
        first = np.tanh(g["W_o"] @ c + g["b_o"])
    gamma_o = first * sigmoid(g["W_f3"] @ ax + g["b_f3"])
    return gamma_f1, gamma_i, c, gamma_o


def step(g, c_prev, a_prev, x):
    _, _, c, gamma_o = gate_values(g, a_prev, x, c_prev)
    if g.get("W_hr") is not None:  # LSTMP: the hidden state is the projected output gate
        return c, g["W_hr"] @ gamma_o
    return c, gamma_o


def run_sequence(g, xs, c0, a0, length=None, reverse=False, valid=None):
    """One sequence ``xs`` (T, I). Returns (outputs (T, H), c_final, a_final).

    Only the steps ``t < length`` that ``valid`` (a (T,) boolean list) marks are run,
    in time order (reversed with ``reverse``); the other steps output zeros.
    """
    T = xs.shape[0]
    L = T if length is None else int(length)
    H = a0.shape[0]
    out = np.zeros((T, H))
    c, a = c0.copy(), a0.copy()
    steps = [t for t in range(L) if valid is None or valid[t]]
    for t in reversed(steps) if reverse else steps:
        c, a = step(g, c, a, xs[t])
        out[t] = a
    return out, c, a


def run_batch(g, xs, c0, a0, lengths=None, reverse=False, valid=None):
    """Batch-major ``xs`` (B, T, I), optional ``valid`` (B, T). Returns (outputs (B, T, H), c (B, H), a (B, H))."""
    outs, cs, as_ = [], [], []
    for b in range(xs.shape[0]):
        L = None if lengths is None else lengths[b]
        o, c, a = run_sequence(g, xs[b], c0[b], a0[b], L, reverse, None if valid is None else valid[b])
        outs.append(o)
        cs.append(c)
        as_.append(a)
    return np.stack(outs), np.stack(cs), np.stack(as_)
