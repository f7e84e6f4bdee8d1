"""Data-parallel plumbing: the rank/world of this process (torchrun: gloo on CPU, NCCL on CUDA) and its device."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lowrank_core.errors import UserInputError

__all__ = ["DistributedContext", "distributed_context", "resolve_device"]


@dataclass
class DistributedContext:
    """Rank and world size of this process; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether a process group is in use."""
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (a copy; CPU tensors for gloo, moved as needed for NCCL)."""
        if not self.enabled:
            return tensor
        import torch.distributed as tdist

        device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        out = tensor.detach().to(device).clone()
        tdist.all_reduce(out)
        return out.cpu()

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            import torch.distributed as tdist

            tdist.barrier()


def distributed_context(device: str) -> DistributedContext:
    """Join the process group torchrun describes (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``), if any.

    gloo on CPU, NCCL on CUDA. A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) needs no group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext()
    import torch.distributed as tdist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not tdist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        tdist.init_process_group(backend=backend)
    return DistributedContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def resolve_device(device: str, dist: DistributedContext | None = None) -> str:
    """``auto`` → ``cuda`` when available else ``cpu``; under DDP on CUDA each rank takes its local GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserInputError("--device cuda: no CUDA device is visible to torch; use --device cpu")
        if dist is not None and dist.enabled and device == "cuda":
            device = f"cuda:{dist.local_rank}"
    elif device != "cpu":
        raise UserInputError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    return device
