"""Training utilities on top of optax, Flax's ``TrainState`` and orbax-checkpoint.

The pieces compose; none of them owns your model:

* losses for sequences: :func:`sequence_cross_entropy` (masked, nats; divide
  by ``ln 2`` with :func:`to_bits` for bits per character), :func:`masked_mse`;
* :func:`default_optimizer`: global-norm clipping + AdamW with a warm-up /
  cosine schedule; any ``optax.GradientTransformation`` can replace it;
* :func:`make_train_step` / :func:`make_eval_step`: jit-compiled steps (the
  train state's buffers are donated) for a loss function you write;
* :func:`fit`: the loop — steps, periodic evaluation, a tqdm progress bar with
  the live loss, a JSON-lines metrics file, orbax checkpoints every N steps
  (keep the last K, each with a checksum; a damaged one is skipped on
  resume), bit-for-bit resume, a clean stop on Ctrl-C or SIGTERM after
  saving the step in flight, and a guard that stops on a non-finite update
  (loss, gradients or parameters) naming the step;
* truncated backpropagation through time: a step may carry a recurrent state
  to the next (gradients stop at the chunk boundary);
* data parallelism: pass a ``jax.sharding.Mesh`` with a ``"data"`` axis to
  :func:`fit` (:func:`data_mesh` builds one): the batch is sharded over it,
  the parameters replicated; on the devices of one process, or of several
  processes and hosts after ``jax.distributed.initialize`` (the same program
  in each);
* :func:`reuse_host_memory`: on Linux, keep the host memory a step frees for
  the next step (XLA:CPU's working buffers then cost no page faults).

Data is a function ``batch_fn(step) -> batch`` of the step number, so that the
data position is part of the step and a resumed run sees exactly the batches
it would have seen.
"""

from __future__ import annotations

from ._train.checkpoints import Checkpointer, CheckpointError, from_snapshot, snapshot
from ._train.host_memory import reuse_host_memory
from ._train.loop import FitResult, NonFiniteLossError, batches_from, fit
from ._train.parallel import PartnerLost, data_mesh
from ._train.records import json_line, read_metrics, write_text_atomic
from ._train.steps import TrainState, default_optimizer, make_eval_step, make_train_step, nnx_train_state, nnx_update
from ._train.stopping import StopRequest
from .losses import masked_mse, sequence_cross_entropy, sequence_mask, to_bits

__all__ = [
    "TrainState",
    "FitResult",
    "NonFiniteLossError",
    "CheckpointError",
    "PartnerLost",
    "StopRequest",
    "snapshot",
    "from_snapshot",
    "read_metrics",
    "write_text_atomic",
    "json_line",
    "batches_from",
    "nnx_train_state",
    "nnx_update",
    "sequence_mask",
    "sequence_cross_entropy",
    "masked_mse",
    "to_bits",
    "default_optimizer",
    "make_train_step",
    "make_eval_step",
    "data_mesh",
    "reuse_host_memory",
    "Checkpointer",
    "fit",
]
