"""One LSTM layer over a whole sequence: checks, layout, and the choice of scan.

:func:`lstm` checks its arguments at trace time, moves the batch to the
second axis (the scans are time-major) and dispatches, in :func:`run_time_major`:
an empty sequence passes its state through; otherwise the padding is zeroed,
then the scan runs with the hand-written backward pass (:mod:`jaxlstm._bptt`,
whole sequence or chunked) or with autodiff (:mod:`jaxlstm._scan`).
The dispatch lives here rather than in ``_scan`` so that ``_bptt`` can build
on ``_scan`` without an import cycle.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from . import _cudnn, _pallas, _vma
from ._bptt import checkpointed, fused
from ._checks import (
    check_bptt,
    check_mask,
    check_params,
    check_same_dtype,
    check_seq_lengths,
    check_sequence,
    check_state,
    check_step_mask,
    check_unroll,
    resolve_bptt,
    sequence_shape,
)
from ._init import zero_state
from ._precision import HALF, state_dtype
from ._scan import autodiff_checkpointed, plain_forward, step_validity, without_padding
from ._types import Array, Bptt, LSTMParams, LSTMState


def prepare(
    params: LSTMParams, xs: Any, state: Any, seq_lengths: Any, time_major: bool, unroll: Any, mask: Any = None
) -> tuple[Array, LSTMState, Array | None, Array | None]:
    """Check every argument of a layer call at trace time; returns them normalised.

    Returns ``(xs, state, lengths, step_mask)`` with the step mask time-major ``(T, *B)``.
    """
    check_params(params)
    xs = jnp.asarray(xs)
    check_sequence(xs, params.input_size, time_major)
    check_same_dtype(xs.dtype, params.dtype, "xs")
    check_unroll(unroll)
    num_steps, batch = sequence_shape(xs, time_major)
    if state is None:
        batch_axis = None if not batch else (1 if time_major else 0)  # an unbatched xs has none
        state = _vma.explicit_like(zero_state(params, batch), xs, batch_axis)
    else:
        state = check_state(
            state, batch, params.hidden_size, state_dtype(params.dtype), params.dtype, params.output_size
        )
    lengths = None
    if seq_lengths is not None:
        lengths = check_seq_lengths(seq_lengths, batch, num_steps)
    step_mask = None
    if mask is not None:
        step_mask = check_step_mask(mask, batch, num_steps, time_major, lengths)
    return xs, state, lengths, step_mask


def run_time_major(
    params: LSTMParams,
    xs: Array,
    state: LSTMState,
    valid: Array | None,
    mask: Array | None,
    *,
    reverse: bool,
    unroll: int | bool,
    bptt: str,
    checkpoint_every: int | None,
    pallas: str | None = None,
) -> tuple[Array, LSTMState]:
    """Dispatch a time-major layer to the autodiff scan, the custom backward, the chunked custom backward,
    or (``pallas``: the kernels' platform) the Pallas kernels.

    ``valid`` ``(T, *B)`` marks the steps that count (``None``: all); ``mask`` is the recurrent dropout mask.
    """
    params, xs, state, valid, mask = _vma.common(params, xs, state, valid, mask)  # inside shard_map: one type
    if xs.shape[0] == 0:  # nothing to scan: no outputs, the state passes through (and so does its gradient)
        return _vma.vary(jnp.zeros(xs.shape[:-1] + (params.output_size,), xs.dtype), _vma.axes(xs)), state
    if valid is not None:
        xs = without_padding(xs, valid)
    if mask is not None:
        mask = jax.lax.stop_gradient(mask)
    if pallas is not None:
        return _pallas.layer(params, xs, state, valid, mask, reverse, unroll, pallas == "pallas:interpret")
    if bptt == "autodiff":
        compute = None
        if params.dtype in HALF:  # autodiff sums the weight gradients in the dtype of what it differentiates
            compute, params = params.dtype, jax.tree.map(lambda a: a.astype(state_dtype(a.dtype)), params)
        if checkpoint_every is None:
            return plain_forward(params, xs, state, valid, mask, reverse, unroll, compute)
        return autodiff_checkpointed(params, xs, state, valid, mask, reverse, unroll, checkpoint_every, compute)
    if checkpoint_every is None:
        return fused(params, xs, state, valid, mask, reverse, unroll)
    return checkpointed(params, xs, state, valid, mask, reverse, unroll, checkpoint_every)


#: The ``impl`` options (see :func:`jaxlstm.lstm`).
IMPLS = ("auto", "scan", "cudnn", "pallas", "pallas_interpret")


def _pallas_platform() -> str:
    """The Pallas backend of this process: ``"gpu"`` (Triton), ``"tpu"`` (Mosaic), or the CPU's name."""
    return {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(jax.default_backend(), jax.default_backend())


def choose_impl(
    impl: str,
    params: LSTMParams,
    xs: Array,
    lengths: Array | None,
    step_mask: Array | None,
    recurrent_mask: Array | None,
    *,
    reverse: bool,
    bptt: str,
    checkpoint_every: int | None,
    explicit_bptt: bool,
) -> str:
    """The implementation a layer call runs (decided at trace time, per platform): ``"scan"``,
    ``"cudnn"``, ``"pallas"`` (the kernels of each platform the program is lowered for, chosen at
    lowering time) or ``"pallas:interpret"``.

    ``auto`` takes cuDNN on a CUDA GPU wherever it computes exactly this call
    (classic cell, forwards, no mask, no projection or recurrent dropout, no
    ``seq_lengths``: zero lengths trouble cuDNN) and the scan everywhere else.
    Not yet measured on a GPU: the size thresholds of ``auto`` are to be set
    from ``benchmarks/device.py``.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; received {impl!r}.")
    if impl == "scan":
        return "scan"
    if impl in ("pallas", "pallas_interpret"):
        if explicit_bptt and bptt != "custom":
            raise ValueError(
                f"impl={impl!r} cannot run bptt='autodiff': the kernels have their own backward pass (reverse "
                "mode only). Use impl='scan' for forward-mode differentiation."
            )
        platform = "interpret" if impl == "pallas_interpret" else _pallas_platform()
        # the options no kernel takes, wherever it runs; the sizes, where this process runs the kernels
        reasons = _pallas.unsupported(
            params, xs, platform if platform in ("interpret", "gpu", "tpu") else None, checkpoint_every=checkpoint_every
        )
        if reasons:
            raise ValueError(
                f"impl={impl!r} cannot run this call; the Pallas kernels need: " + "; ".join(reasons) + "."
            )
        return "pallas:interpret" if impl == "pallas_interpret" else "pallas"
    reasons = _cudnn.unsupported(params, xs, reverse=reverse, step_mask=step_mask, recurrent_mask=recurrent_mask)
    if impl == "cudnn":
        if not _cudnn.available():
            raise ValueError(
                f"impl='cudnn' needs a CUDA GPU with jaxlib's cuDNN RNN kernels; this process runs on "
                f"{jax.default_backend()!r}. Use impl='auto' (cuDNN where available, the scan elsewhere)."
            )
        if explicit_bptt and bptt != "custom":
            reasons.append("no bptt='autodiff' (cuDNN has its own backward pass; reverse mode only)")
        if checkpoint_every is not None:
            reasons.append("no checkpoint_every (cuDNN keeps its own reserve space)")
        if reasons:
            raise ValueError("impl='cudnn' cannot run this call; cuDNN needs: " + "; ".join(reasons) + ".")
        return "cudnn"
    usable = not reasons and lengths is None and bptt == "custom" and checkpoint_every is None
    return "cudnn" if usable and _cudnn.available() else "scan"


@functools.partial(jax.jit, static_argnames=("time_major",))
def _cudnn_jit(
    params: LSTMParams, xs: Array, state: LSTMState, lengths: Array | None, *, time_major: bool
) -> tuple[Array, LSTMState]:
    if time_major:
        xs = jnp.swapaxes(xs, 0, 1)
    hs, final = _cudnn.lstm(params, xs, state, lengths)
    return (jnp.swapaxes(hs, 0, 1) if time_major else hs), final


_PORTABLE: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxlstm_portable", default=False)


@contextlib.contextmanager
def portable() -> Iterator[None]:
    """Trace layers to operations every exporter handles: a backward (``reverse``) pass becomes a forward
    scan over the time-flipped sequence, and the scan runs on every platform (no cuDNN or Pallas kernels).

    The numbers are the same (the same steps in the same order); only the
    program's form changes. Use it around an ONNX conversion, which has no
    reverse scan (``jax2onnx``: "Reverse scan is not supported"); ``jax.export``
    needs no such help.

    Example:

      >>> import jax, jaxlstm
      >>> p = jaxlstm.init_params(jax.random.key(0), 3, 4)
      >>> xs = jax.numpy.ones((2, 5, 3))
      >>> with jaxlstm.portable():
      ...     ys, _ = jaxlstm.lstm(p, xs, reverse=True)
      >>> bool(jax.numpy.allclose(ys, jaxlstm.lstm(p, xs, reverse=True)[0]))
      True
    """
    token = _PORTABLE.set(True)
    try:
        yield
    finally:
        _PORTABLE.reset(token)


@functools.partial(
    jax.jit, static_argnames=("reverse", "time_major", "unroll", "bptt", "checkpoint_every", "pallas", "flip")
)
def _lstm_jit(
    params: LSTMParams,
    xs: Array,
    state: LSTMState,
    lengths: Array | None,
    step_mask: Array | None,
    mask: Array | None,
    *,
    reverse: bool,
    time_major: bool,
    unroll: int | bool,
    bptt: str,
    checkpoint_every: int | None,
    pallas: str | None = None,
    flip: bool = False,
) -> tuple[Array, LSTMState]:
    batched_batch_major = xs.ndim == 3 and not time_major
    if batched_batch_major:
        xs = jnp.swapaxes(xs, 0, 1)
    valid = step_validity(lengths, step_mask, xs.shape[0])
    if flip:  # the reverse pass as a forward scan over the flipped steps (portable(): no reverse scan)
        xs, valid, reverse = jnp.flip(xs, 0), None if valid is None else jnp.flip(valid, 0), False
    hs, final = run_time_major(
        params,
        xs,
        state,
        valid,
        mask,
        reverse=reverse,
        unroll=unroll,
        bptt=bptt,
        checkpoint_every=checkpoint_every,
        pallas=pallas,
    )
    if flip:
        hs = jnp.flip(hs, 0)
    if batched_batch_major:
        hs = jnp.swapaxes(hs, 0, 1)
    return hs, final


def lstm(
    params: LSTMParams,
    xs: Array,
    state: LSTMState | None = None,
    *,
    seq_lengths: Array | None = None,
    mask: Array | None = None,
    reverse: bool = False,
    time_major: bool = False,
    unroll: int | bool = 1,
    bptt: Bptt | None = None,
    checkpoint_every: int | None = None,
    recurrent_mask: Array | None = None,
    backward: str | None = None,
    impl: str = "auto",
) -> tuple[Array, LSTMState]:
    """Run one LSTM layer over a sequence (``jax.lax.scan``, jit-compiled).

    Args:
      params: :class:`LSTMParams` (the output-map or the classic cell).
      xs: ``(B, T, I)``; ``(T, B, I)`` with ``time_major=True``; or one
        unbatched sequence ``(T, I)``. Must have the params' dtype.
      state: initial :class:`LSTMState`, each field ``(B, H)`` (``(H,)``
        unbatched); zeros when ``None``.
      seq_lengths: optional ``(B,)`` integers in ``[0, T]`` (a scalar for an
        unbatched sequence). Steps ``t >= L`` leave the state unchanged and
        output zeros; the final state is the state after the last valid step
        (the initial state when ``L = 0``). Whatever the padded steps of
        ``xs`` hold (NaN and inf included) never reaches the outputs or the
        gradients. Concrete lengths outside ``[0, T]`` raise a ``ValueError``;
        traced ones (inside ``jax.jit``) cannot be checked and are clamped to
        ``[0, T]``.
      mask: optional boolean ``(B, T)`` (``(T, B)`` with ``time_major=True``,
        ``(T,)`` unbatched), true at the steps that count, in any pattern:
        left padding, holes, right padding. A masked step leaves the state
        unchanged and outputs zeros, exactly as a step past ``seq_lengths``
        (whatever ``xs`` holds there never reaches outputs or gradients); the
        final state is the state after the last valid step. With both
        ``mask`` and ``seq_lengths``, a step counts if both say so, and a
        concrete mask that marks a step at or past its sequence's length
        raises a ``ValueError``.
      reverse: process time backwards. With ``seq_lengths`` or ``mask``, each
        sequence's valid steps run from the last to the first (masked steps
        stay where they are). Outputs are always in the input's time order.
      time_major: layout of ``xs`` and the outputs.
      unroll: passed to ``jax.lax.scan``.
      bptt: how gradients flow back through time. ``"custom"`` (default): a
        hand-written backward pass (``jax.custom_vjp``) that forms the weight
        gradients as one large matmul after the reverse scan; fastest for
        training, supports ``jax.grad``/``jax.vjp`` (also to second order in
        reverse mode). ``"autodiff"``: plain autodiff through ``lax.scan``;
        use it for forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``).
      checkpoint_every: ``None`` (default) keeps every step's gates for the
        backward pass (memory ``O(T)``). An int ``k`` keeps only the state at
        the start of each chunk of ``k`` steps and recomputes a chunk's gates
        during the backward pass: memory ``O(T/k + k)`` for about one extra
        forward pass of compute. ``k ~ sqrt(T)`` is a good choice for very
        long sequences. Results are identical.
      recurrent_mask: optional ``(B, H)`` (``(H,)`` unbatched) multiplier of
        ``a^{t-1}`` where it enters the gates, the same at every step: this is
        variational recurrent dropout (Gal & Ghahramani, 2016) when it holds
        ``bernoulli(1 - rate) / (1 - rate)``. Treated as a constant (no
        gradient).
      backward: deprecated name of ``bptt`` (``"fused"`` is ``"custom"``); it
        warns and will be removed in jaxlstm 0.2.0.
      impl: ``"auto"`` (default), ``"scan"`` or ``"cudnn"``. ``"scan"`` is
        jaxlstm's own ``lax.scan`` (every platform, every option above).
        ``"cudnn"`` runs the layer through cuDNN's persistent LSTM kernels
        (``jax.experimental.rnn``) on a CUDA GPU: the classic cell only,
        forwards, without ``mask``, projection or ``recurrent_mask``; anything
        else raises. ``"auto"`` takes cuDNN on a CUDA GPU where it computes
        exactly the same (and no ``seq_lengths`` are given, since cuDNN
        mishandles zero lengths), the scan otherwise. Chosen at trace time.
        ``"pallas"`` runs the recurrence as one Pallas kernel per direction
        of the pass (forward and backward), the whole time loop inside it,
        on a GPU (Triton: ``B`` and ``H`` powers of two, ``>= 16``) or a TPU
        (Mosaic: ``H`` a multiple of 128); both cells, ``seq_lengths``,
        ``mask``, ``reverse``, ``recurrent_mask`` and half precision, not
        ``proj_size`` or ``checkpoint_every``. ``"pallas_interpret"`` runs
        the same kernels through the Pallas interpreter on any platform
        (slow: for checking). ``"auto"`` does not pick the kernels yet: they
        are not measured on a device.

    Returns:
      ``(hiddens, final_state)``: ``hiddens`` in the layout of ``xs`` with
      ``H`` features (``hiddens[..., t, :]`` is ``a^t``), and the final
      :class:`LSTMState`.

    Works under ``jax.jit`` (the keyword options are static), ``jax.grad``
    and ``jax.vmap``, and inside ``jax.shard_map`` (e.g. the batch split over
    a mesh axis, the weights replicated: their gradient comes out summed over
    the axis; the Pallas kernels there need ``check_vma=False``, and then the
    weights' gradient is per shard, summed with ``jax.lax.psum``). Bad shapes
    or dtypes raise at trace time.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlstm
      >>> p = jaxlstm.init_params(jax.random.key(0), input_size=3, hidden_size=5)
      >>> xs = jnp.ones((2, 7, 3))                      # (B, T, I)
      >>> hs, final = jaxlstm.lstm(p, xs, seq_lengths=jnp.array([7, 4]))
      >>> hs.shape, final.hidden.shape
      ((2, 7, 5), (2, 5))
      >>> bool((hs[1, 4:] == 0).all())
      True
    """
    explicit_bptt = bptt is not None or backward is not None
    bptt = resolve_bptt(bptt, backward)
    xs, state, lengths, step_mask = prepare(params, xs, state, seq_lengths, time_major, unroll, mask)
    check_bptt(bptt, checkpoint_every)
    if recurrent_mask is not None:
        recurrent_mask = check_mask(recurrent_mask, state.hidden.shape, params.dtype)
    flip = bool(reverse) and _PORTABLE.get()
    chosen = choose_impl(
        "scan" if _PORTABLE.get() else impl,
        params,
        xs,
        lengths,
        step_mask,
        recurrent_mask,
        reverse=bool(reverse),
        bptt=bptt,
        checkpoint_every=checkpoint_every,
        explicit_bptt=explicit_bptt,
    )
    if chosen == "cudnn":  # pragma: no cover - needs a CUDA GPU
        return _cudnn_jit(params, xs, state, lengths, time_major=bool(time_major))
    try:
        return _lstm_jit(
            params,
            xs,
            state,
            lengths,
            step_mask,
            recurrent_mask,
            reverse=bool(reverse),
            time_major=bool(time_major),
            unroll=unroll,
            bptt=bptt,
            checkpoint_every=checkpoint_every,
            pallas=chosen if chosen.startswith("pallas") else None,
            flip=flip,
        )
    except TypeError as e:
        if "forward-mode" not in str(e):
            raise
        raise TypeError(
            "forward-mode differentiation (jax.jvp, jax.jacfwd, jax.hessian) reached the hand-written backward "
            'pass (bptt="custom", the default), which supports reverse mode only. Pass bptt="autodiff" to '
            "jaxlstm.lstm (or the stack, bidirectional layer or module) for forward mode."
        ) from None
