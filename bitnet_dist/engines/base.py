"""The engine interface: what a training loop may ask of megatron, DeepSpeed or any later engine.

The train loop (bitnet_dist/train.py) owns the schedule, the data order, telemetry and checkpoint
*directories*; an engine owns the model's parallel wiring, the optimizer and what goes inside a
checkpoint directory. Batches are dicts of CPU or device tensors:

    tokens    int64 [micro_batch, seq]     input ids
    labels    int64 [micro_batch, seq]     next-token targets
    loss_mask float [micro_batch, seq]     1 where the token counts in the loss

Losses are token-weighted means over all micro-batches of a step and over all data-parallel ranks,
so every engine reports the same number for the same global batch.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

Batch = dict[str, torch.Tensor]


@dataclass
class StepStats:
    """What one optimizer step reports. Floats are identical on every rank."""

    loss: float  # token-weighted mean over the global batch
    grad_norm: float  # global L2 norm before clipping
    num_tokens: int  # loss tokens in the global batch
    skipped: bool = False  # True when the step was skipped (inf/nan gradients)


class Engine(abc.ABC):
    """One training engine, constructed as ``Engine(cfg: TrainConfig)`` (no side effects).

    Life cycle: ``init_parallel()`` (process groups; after it dp_rank/dp_size/device are valid, so the
    data pipeline can be built for this rank), then ``build(vocab_size)`` once, then any sequence of
    the other calls. torch.distributed itself is started before, by bitnet_dist.distributed.
    """

    name: str = "base"

    @abc.abstractmethod
    def init_parallel(self) -> None:
        """Create the tensor/pipeline/data-parallel process groups (megatron parallel_state)."""

    @abc.abstractmethod
    def build(self, vocab_size: int) -> None:
        """Create the model (our layer spec), its parallel wrappers and the optimizer."""

    @abc.abstractmethod
    def train_step(self, micro_batches: Sequence[Batch], lr: float, weight_decay: float) -> StepStats:
        """Forward+backward over this rank's micro-batches, reduce gradients, clip, step.

        ``lr`` and ``weight_decay`` are applied to every parameter group that decays (norms and
        embeddings of the no-decay group keep weight decay 0) before the update.
        """

    @abc.abstractmethod
    def eval_loss(self, batches: Iterable[Batch]) -> tuple[float, int]:
        """Token-weighted mean loss and token count over ``batches`` (this rank's share), reduced over DP."""

    @abc.abstractmethod
    def save(self, ckpt_dir: Path, trainer_state: dict[str, Any]) -> None:
        """Write model, optimizer and ``trainer_state`` into the existing directory ``ckpt_dir``.

        Called on every rank; ``ckpt_dir`` is a temporary directory that bitnet_dist.checkpoint
        renames into place only after every rank returned, so an engine never renames anything.
        """

    @abc.abstractmethod
    def load(self, ckpt_dir: Path) -> dict[str, Any]:
        """Restore model and optimizer from ``ckpt_dir``; return the ``trainer_state`` saved with them."""

    @abc.abstractmethod
    def set_act_bits(self, bits: int) -> None:
        """Switch every BitLinear / H-BitLinear of every local model chunk to ``bits`` (4 or 8)."""

    @abc.abstractmethod
    def model_chunks(self) -> list[torch.nn.Module]:
        """The unwrapped local model chunks (GPTModel instances), for telemetry probes."""

    def checkpoint_files(self) -> list[str]:
        """Glob patterns (relative to a checkpoint directory) of the files ``load`` needs: a checkpoint whose
        manifest lacks one is incomplete (bitnet_dist.checkpoint.verify)."""
        return []

    def state_tensors(self) -> list:
        """This rank's tensors a checkpoint holds (model and optimizer state), for the finiteness check before a
        checkpoint is published (bitnet_dist.engines.guard). Default: the model chunks' parameters."""
        return [p for m in self.model_chunks() for p in m.parameters()]

    def fused_paths(self) -> list[str]:
        """The fused paths outside the BitLinear layers that this run takes (bitnet_dist.fusions), after build():
        any of "rope", "cross_entropy", "adamw"; named in the run's start record and log."""
        return []

    # -- topology, valid after init_parallel() -------------------------------------------------------------
    @property
    @abc.abstractmethod
    def dp_rank(self) -> int: ...

    @property
    @abc.abstractmethod
    def dp_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def device(self) -> torch.device: ...

    @property
    def micro_batch_multiple(self) -> int:
        """Every call's micro-batch count (train_step, eval_loss) must be a multiple of this: 1, or with megatron's
        interleaved pipeline schedule parallel.pipeline."""
        return 1

    @property
    def is_logging_rank(self) -> bool:
        """The one rank that writes metrics and prints (global rank 0; it holds the loss on every engine)."""
        return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
