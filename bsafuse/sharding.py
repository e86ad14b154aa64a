"""Folder runs under `torchrun`: one disjoint shard of the pairs per process, one combined summary.

``torchrun --nproc_per_node N -m bsafuse fuse IN_DIR FIXED_DIR -o OUT_DIR`` starts N copies of the
command (on each node) and sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE. Pair i of the
sorted pair list goes to the process with rank ``i % WORLD_SIZE``: the shards are disjoint and
cover every pair, so no pair is fused twice and every output file has exactly one writer. Each
process uses its own device: ``cuda:LOCAL_RANK`` when GPUs are used, else an equal share of the
CPU cores. Computing needs no communication at all.

The combined summary: rank 0 gathers every rank's pair outcomes with one ``all_gather_object`` over
a gloo process group and reports them all; the other ranks report nothing. A process group
rather than per-rank summary files in the output folder, because

- it needs no shared file system (nodes may write to their own local output folders);
- nothing stale can be read: a rank file left behind by an earlier, interrupted run into the same
  folder would look like this run's;
- nobody waits forever: if a process dies, torchrun stops the others, whereas rank 0 polling for
  a file would need a guessed timeout;
- gloo is in every torch build, CPU-only or CUDA.

The group is joined when the run starts (a misconfigured launch fails before any work) with a long
collective timeout, since shards can finish hours apart. A process group the caller already set
up is reused through a gloo subgroup.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bsafuse.errors import InputError

SUMMARY_TIMEOUT = timedelta(days=7)  # the longest one rank may wait for the others' summaries


class Ranked:
    """What a process of a torchrun job knows of its place: rank among world_size processes."""

    rank: int
    world_size: int

    @property
    def enabled(self) -> bool:
        """Whether this is one of several processes."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process reports and writes the run's shared files (rank 0)."""
        return self.rank == 0


@dataclass(frozen=True)
class Shard(Ranked):
    """This process's place among the processes of a run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    def owns(self, index: int) -> bool:
        """Whether item `index` of the sorted list belongs to this process."""
        return index % self.world_size == self.rank


def current_shard() -> Shard:
    """The shard torchrun's environment variables describe; InputError if they contradict."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    raw = {name: os.environ.get(name) for name in names}
    if raw["WORLD_SIZE"] in (None, "", "1"):
        return Shard()
    try:
        rank, world = int(raw["RANK"] or ""), int(raw["WORLD_SIZE"] or "")
        local_rank = int(raw["LOCAL_RANK"] or 0)
        local_world = int(raw["LOCAL_WORLD_SIZE"] or 1)
    except ValueError:
        raise InputError(
            f"torchrun variables {raw} are not integers; start bsafuse with torchrun, "
            "or unset WORLD_SIZE for a single process"
        ) from None
    if not 0 <= rank < world or not 0 <= local_rank < local_world:
        raise InputError(
            f"RANK={rank} must be in [0, WORLD_SIZE={world}) and LOCAL_RANK={local_rank} in "
            f"[0, LOCAL_WORLD_SIZE={local_world}); start bsafuse with torchrun"
        )
    return Shard(rank, world, local_rank, local_world)


def device_for(shard: Shard, requested: Any) -> Any:
    """Each process's device: `auto`/`cuda` become cuda:LOCAL_RANK when GPUs are used."""
    if not shard.enabled or str(requested) not in ("auto", "cuda"):
        return requested
    import torch

    if not torch.cuda.is_available():
        return "cpu" if str(requested) == "auto" else requested  # `cuda` fails later, with the reason
    return f"cuda:{shard.local_rank % torch.cuda.device_count()}"


class Summary:
    """The process group that gathers the per-rank outcomes (nothing at all for one process)."""

    def __init__(self, shard: Shard, device: Any) -> None:
        self.shard = shard
        self._group: Any = None
        self._owned = False
        if not shard.enabled:
            return
        import torch
        import torch.distributed as dist

        if str(device).startswith("cpu"):
            # torchrun sets OMP_NUM_THREADS=1; give each process its share of this node's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // shard.local_world_size))
        if dist.is_initialized():
            self._group = dist.new_group(backend="gloo", timeout=SUMMARY_TIMEOUT)
        else:
            dist.init_process_group(backend="gloo", timeout=SUMMARY_TIMEOUT)
            self._owned = True

    def gather(self, payload: Any) -> list[Any]:
        """Every rank's `payload`, in rank order (a collective: every rank must call it once)."""
        if not self.shard.enabled:
            return [payload]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.shard.world_size
        dist.all_gather_object(gathered, payload, group=self._group)
        return gathered

    def close(self) -> None:
        """Leave the group this object created (a caller's own group is left alone)."""
        if not self.shard.enabled:
            return
        import torch.distributed as dist

        if self._owned and dist.is_initialized():
            dist.destroy_process_group()
        elif self._group is not None:
            dist.destroy_process_group(self._group)
        self._group, self._owned = None, False
