"""What the linen and NNX modules share: dtype policy, layer sizes, the call into the core."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from . import _errors
from ._params import LSTMState, _positive_int
from ._stack import _merge_fn, lstm_stack


def merged_size(merge, hidden_size: int) -> int:
    """Features after merging the two directions of a bidirectional layer."""
    spec = jax.ShapeDtypeStruct((1, hidden_size), jnp.float32)
    return int(jax.eval_shape(_merge_fn(merge), spec, spec).shape[-1])


def layer_input_sizes(input_size: int, hidden_size: int, num_layers: int, bidirectional: bool, merge) -> list[int]:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int; received {num_layers!r}.")
    _positive_int(hidden_size, "hidden_size")
    out = hidden_size if not bidirectional else merged_size(merge, hidden_size)
    return [input_size] + [out] * (num_layers - 1)


def compute_dtype(xs, dtype, param_dtype):
    """The dtype the core runs in: ``dtype`` if given, else the promotion of the input's and the params'."""
    _errors.check_floating(jnp.result_type(xs), "xs")
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.promote_types(jnp.result_type(xs), param_dtype)


def cast_tree(tree, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a).astype(dtype), tree)


def run(
    layers,
    xs,
    initial_state,
    *,
    dtype,
    param_dtype,
    seq_lengths,
    merge,
    reverse: bool,
    time_major: bool,
    unroll,
    backward: str,
    checkpoint_every: Optional[int],
    dropout_rate: float,
    recurrent_dropout_rate: float,
    dropout_key: Optional[Any],
):
    """Cast to the compute dtype and run :func:`jaxlstm.lstm_stack`."""
    xs = jnp.asarray(xs)
    cdt = compute_dtype(xs, dtype, param_dtype)
    layers = cast_tree(layers, cdt)
    if initial_state is not None:  # lstm_stack checks there is one per layer
        initial_state = tuple(None if s is None else cast_tree(s, cdt) for s in initial_state)
    return lstm_stack(
        layers,
        xs.astype(cdt),
        initial_state,
        seq_lengths=seq_lengths,
        reverse=reverse,
        merge=merge,
        time_major=time_major,
        unroll=unroll,
        backward=backward,
        checkpoint_every=checkpoint_every,
        dropout_rate=dropout_rate,
        recurrent_dropout_rate=recurrent_dropout_rate,
        dropout_key=dropout_key,
    )


def zero_carry(batch_shape, hidden_size: int, dtype) -> LSTMState:
    z = jnp.zeros(tuple(batch_shape) + (hidden_size,), dtype)
    return LSTMState(z, z)


def needs_dropout_key(deterministic: bool, dropout_rate: float, recurrent_dropout_rate: float, num_layers: int) -> bool:
    return not deterministic and (recurrent_dropout_rate > 0.0 or (dropout_rate > 0.0 and num_layers > 1))



def final_summary(states, bidirectional: bool) -> jax.Array:
    """The last layer's final hidden state (both directions concatenated if bidirectional)."""
    last = states[-1]
    if bidirectional:
        return jnp.concatenate([last.forward.hidden, last.backward.hidden], axis=-1)
    return last.hidden
