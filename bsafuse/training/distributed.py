"""Process groups for `torchrun`: one training process per GPU (nccl) or per CPU slot (gloo).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (and the rendezvous variables);
without them there is one process and no process group. Rank 0 alone logs and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from bsafuse.device import pick_device
from bsafuse.errors import DeviceError
from bsafuse.sharding import Ranked, current_shard


@dataclass(frozen=True)
class Distributed(Ranked):
    """Where this process stands: rank among world_size processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def launched_by_torchrun() -> bool:
    return current_shard().enabled


def setup(device: str = "auto") -> Distributed:
    """Pick this process's device and, under torchrun, join the process group.

    Under torchrun, `auto` and `cuda` mean cuda:LOCAL_RANK (nccl); `cpu` uses gloo.
    """
    if not launched_by_torchrun():
        return Distributed(device=pick_device(device))
    shard = current_shard()  # torchrun's environment, checked
    rank, world, local_rank = shard.rank, shard.world_size, shard.local_rank
    chosen = pick_device(device)
    if chosen.type == "cuda":
        if device not in ("auto", "cuda"):
            raise DeviceError(
                f"--device {device} names one GPU, but torchrun gives each process its own "
                "(cuda:LOCAL_RANK); use --device auto or cuda"
            )
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(
                f"torchrun started process {local_rank} on this node but only {torch.cuda.device_count()} "
                "GPU(s) are visible; set --nproc_per_node to at most the number of GPUs"
            )
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    else:
        # torchrun sets OMP_NUM_THREADS=1; share the cores among this node's processes instead.
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend, timeout=timedelta(minutes=30), device_id=chosen if backend == "nccl" else None
    )
    return Distributed(rank=rank, world_size=world, local_rank=local_rank, device=chosen)


def teardown(info: Distributed) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: torch.Tensor, info: Distributed) -> torch.Tensor:
    """Sum a tensor over all processes (in place on a copy); identity for one process."""
    if not info.enabled:
        return values
    out = values.to(info.device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(values.device)


def barrier(info: Distributed) -> None:
    if info.enabled:
        dist.barrier()
