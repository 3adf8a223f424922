"""Multi-process training with PyTorch's distributed engine (``torchrun``): ranks, shards, sync."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a distributed run; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) logs, prints and writes checkpoints."""
        return self.rank == 0

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch (every rank draws the same global batches)."""
        return indices[self.rank :: self.world_size] if self.enabled else indices

    def average_gradients(self, module: nn.Module) -> None:
        """All-reduce and average the gradients of ``module`` (for parts not wrapped in DDP)."""
        if not self.enabled:
            return
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size


def broadcast_buffers(context: DistContext, module: nn.Module) -> None:
    """Copy rank 0's buffers (batch-norm statistics) to every rank.

    DDP syncs buffers only at the start of the next forward, so without this the
    ranks would evaluate and checkpoint slightly different models after an epoch.
    """
    if context.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def broadcast_parameters(context: DistContext, module: nn.Module) -> None:
    """Copy rank 0's parameters to every rank (after a step that each rank took alone)."""
    if context.enabled:
        with torch.no_grad():
            for parameter in module.parameters():
                dist.broadcast(parameter.data, src=0)


def init_from_environment() -> DistContext:
    """Join the process group ``torchrun`` describes (RANK/WORLD_SIZE); single process otherwise.

    NCCL on CUDA (each process on its LOCAL_RANK's GPU), gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return DistContext(dist.get_rank(), dist.get_world_size())


def current_context() -> DistContext:
    """The context of an already initialised process group (or a single process)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size())
    return DistContext()
