"""Sharding an evaluation across processes started by `torchrun` (one rank per GPU, or CPU processes).

Only used when WORLD_SIZE > 1: the process group is gloo on CPU and NCCL on CUDA, where each rank
takes the GPU of its LOCAL_RANK. Ranks never exchange tensors: each writes its own JSONL shard,
and the group is used for barriers only (rank 0 merges the shards after the last one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

T = TypeVar("T")

# Ranks wait at the final barrier for the slowest one: a generous timeout (an evaluation shard of
# a 7B model can take hours), overridable in seconds.
TIMEOUT_ENV = "DLLM_CACHE_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, items: list[T]) -> list[T]:
        """Rank r of N takes items r, r+N, r+2N, ..."""
        return items[self.rank :: self.world_size]


def init_distributed(device: str) -> tuple[Dist, str]:
    """(this process's place, its device) from torchrun's environment; a no-op without WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.startswith("cuda"):
        if device == "cuda":
            device = f"cuda:{local}"
        torch.cuda.set_device(torch.device(device))
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 24 * 3600)))
        dist.init_process_group(backend, timeout=timeout)
    return Dist(rank, world, local), device


def barrier(d: Dist) -> None:
    if not d.active:
        return
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[d.local_rank])
    else:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if not d.active:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
