"""What the linen and NNX modules share: dtype policy, layer sizes, the call into the core."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ._cell import step
from ._checks import check_floating, check_num_layers, positive_int
from ._stack import lstm_stack, merge_fn
from ._types import Array, LSTMParams, LSTMState


def merged_size(merge: Any, hidden_size: int) -> int:
    """Features after merging the two directions of a bidirectional layer."""
    spec = jax.ShapeDtypeStruct((1, hidden_size), jnp.float32)
    return int(jax.eval_shape(merge_fn(merge), spec, spec).shape[-1])


def layer_input_sizes(input_size: int, hidden_size: int, num_layers: int, bidirectional: bool, merge: Any) -> list[int]:
    """The input size of each layer of a stack."""
    check_num_layers(num_layers)
    positive_int(hidden_size, "hidden_size")
    out = hidden_size if not bidirectional else merged_size(merge, hidden_size)
    return [input_size] + [out] * (num_layers - 1)


def compute_dtype(xs: Any, dtype: Any, param_dtype: Any) -> Any:
    """The dtype the core runs in: ``dtype`` if given, else the promotion of the input's and the params'."""
    check_floating(jnp.result_type(xs), "xs")
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.promote_types(jnp.result_type(xs), param_dtype)


def cast_tree(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda a: jnp.asarray(a).astype(dtype), tree)


def cell_step(params: LSTMParams, carry: Any, x: Any, dtype: Any, param_dtype: Any) -> tuple[LSTMState, Array]:
    """One step of a module cell: params, carry and input cast to the compute dtype, then the fused step."""
    x = jnp.asarray(x)
    cdt = compute_dtype(x, dtype, param_dtype)
    params = cast_tree(params, cdt)
    carry = LSTMState(*cast_tree(tuple(carry), cdt))
    return step(params, carry, x.astype(cdt))


def run(
    layers: Any,
    xs: Any,
    initial_state: Any,
    *,
    dtype: Any,
    param_dtype: Any,
    seq_lengths: Any,
    merge: Any,
    reverse: bool,
    time_major: bool,
    unroll: Any,
    bptt: str | None,
    checkpoint_every: int | None,
    dropout_rate: float,
    recurrent_dropout_rate: float,
    dropout_key: Any | None,
    backward: str | None = None,
) -> tuple[Array, tuple]:
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
        bptt=bptt,  # type: ignore[arg-type]
        checkpoint_every=checkpoint_every,
        dropout_rate=dropout_rate,
        recurrent_dropout_rate=recurrent_dropout_rate,
        dropout_key=dropout_key,
        backward=backward,
    )


def needs_dropout_key(
    deterministic: bool | None, dropout_rate: float, recurrent_dropout_rate: float, num_layers: int
) -> bool:
    return not deterministic and (recurrent_dropout_rate > 0.0 or (dropout_rate > 0.0 and num_layers > 1))


def final_summary(states: Any, bidirectional: bool) -> Array:
    """The last layer's final hidden state (both directions concatenated if bidirectional)."""
    last = states[-1]
    if bidirectional:
        return jnp.concatenate([last.forward.hidden, last.backward.hidden], axis=-1)
    return last.hidden
