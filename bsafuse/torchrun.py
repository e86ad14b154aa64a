"""Jobs under `torchrun`: where a process stands, its device, its cores and its process group.

``torchrun --nproc_per_node N -m bsafuse fuse|train ...`` starts N copies of the command (on each
node) and sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE. Both commands that run under it
share one mechanism, this module:

- one placement type, `Placement` (rank, world size, local rank, local world size), read from those
  variables by `placement()`; without them a process is rank 0 of 1;
- one device rule, `device_for`: ``cuda:LOCAL_RANK`` when GPUs are used, else the CPU;
- one thread rule, `share_cores`: each of a node's processes gets an equal share of its CPU cores
  (torchrun itself sets OMP_NUM_THREADS=1);
- one process group type, `ProcessGroup`: joined when the run starts (a misconfigured launch fails
  before any work), left when it ends; a group the caller already set up is reused through a
  subgroup. It gathers objects (`gather`), adds tensors (`all_sum`) and waits (`barrier`).

Folder runs of `fuse` (bsafuse.batch): pair i of the sorted pair list goes to the process with rank
``i % WORLD_SIZE`` (`Placement.owns`): the shards are disjoint and cover every pair, so no pair is
fused twice and every output file has exactly one writer. Computing needs no communication at all.
The combined summary: rank 0 gathers every rank's pair outcomes with one ``all_gather_object`` over
a gloo group and reports them all; the other ranks report nothing. A process group rather than
per-rank summary files in the output folder, because

- it needs no shared file system (nodes may write to their own local output folders);
- nothing stale can be read: a rank file left behind by an earlier, interrupted run into the same
  folder would look like this run's;
- nobody waits forever: if a process dies, torchrun stops the others, whereas rank 0 polling for
  a file would need a guessed timeout;
- gloo is in every torch build, CPU-only or CUDA.

Its collective timeout is long (GATHER_TIMEOUT), since shards can finish hours apart.

Training (bsafuse.training): `ProcessGroup.for_training` joins with nccl on GPUs and gloo on CPUs,
and a timeout of STEP_TIMEOUT, as every step synchronises the processes; DistributedDataParallel
averages the gradients over the group, and the trainer adds its epoch and validation sums with
`all_sum`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from bsafuse.device import pick_device
from bsafuse.errors import DeviceError, InputError

Backend = Literal["gloo", "nccl"]
GATHER_TIMEOUT = timedelta(days=7)  # the longest one rank of a folder run may wait for the others
STEP_TIMEOUT = timedelta(minutes=30)  # the longest a training collective may wait for a slow rank
ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class Placement:
    """Where this process stands in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # rank among the processes of this node
    local_world_size: int = 1  # processes on this node

    @property
    def enabled(self) -> bool:
        """Whether this is one of several processes."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process reports and writes the run's shared files (rank 0)."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether item `index` of a sorted list belongs to this process."""
        return index % self.world_size == self.rank


def placement() -> Placement:
    """The placement torchrun's environment variables describe; InputError if they contradict."""
    raw = {name: os.environ.get(name) for name in ENVIRONMENT}
    if raw["WORLD_SIZE"] in (None, "", "1"):
        return Placement()
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
    return Placement(rank, world, local_rank, local_world)


def device_for(place: Placement, requested: str | torch.device) -> torch.device:
    """This process's device: `requested` for one process; under torchrun cuda:LOCAL_RANK or the CPU.

    Under torchrun, `auto` and `cuda` mean cuda:LOCAL_RANK (the CPU when no GPU is visible, for
    `auto`); a request for one GPU (cuda:N) is refused, since every process needs its own.
    """
    chosen = pick_device(requested)  # DeviceError for a device that does not exist
    if not place.enabled or chosen.type == "cpu":
        return chosen
    if str(requested) not in ("auto", "cuda"):
        raise DeviceError(
            f"--device {requested} names one GPU, but torchrun gives each process its own "
            "(cuda:LOCAL_RANK); use --device auto or cuda"
        )
    count = torch.cuda.device_count()
    if place.local_rank >= count:
        raise DeviceError(
            f"torchrun started process {place.local_rank} on this node but only {count} GPU(s) are "
            "visible; set --nproc_per_node to at most the number of GPUs"
        )
    return torch.device("cuda", place.local_rank)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def share_cores(place: Placement) -> int:
    """Under torchrun, set torch's threads to this process's equal share of the node's cores.

    Returns torch's thread count (left as it is for a single process).
    """
    if place.enabled:
        torch.set_num_threads(max(1, available_cores() // place.local_world_size))
    return torch.get_num_threads()


class ProcessGroup:
    """This process's membership of the job's process group; does nothing for a single process.

    Joining takes this process's share of the cores (`share_cores`) and, for nccl, makes `device`
    the current GPU. Use it as a context manager, or call `close()`, to leave.
    """

    def __init__(
        self,
        place: Placement,
        device: str | torch.device,
        *,
        backend: Backend = "gloo",
        timeout: timedelta = GATHER_TIMEOUT,
    ) -> None:
        self.place, self.device, self.backend = place, pick_device(device), backend
        self.group: Any = None  # the torch group of the collectives; None: the default (whole) group
        self._owned = False
        if not place.enabled:
            return
        share_cores(place)
        if backend == "nccl":
            torch.cuda.set_device(self.device)
        if dist.is_initialized():
            self.group = dist.new_group(backend=backend, timeout=timeout)
        else:
            device_id = self.device if backend == "nccl" else None
            dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id)
            self._owned = True

    @classmethod
    def for_training(cls, place: Placement, requested: str | torch.device) -> ProcessGroup:
        """The group of a training run: nccl on cuda:LOCAL_RANK, else gloo on the CPU."""
        device = device_for(place, requested)
        backend: Backend = "nccl" if device.type == "cuda" else "gloo"
        return cls(place, device, backend=backend, timeout=STEP_TIMEOUT)

    def gather(self, payload: Any) -> list[Any]:
        """Every rank's `payload`, in rank order (a collective: every rank must call it once)."""
        if not self.place.enabled:
            return [payload]
        gathered: list[Any] = [None] * self.place.world_size
        dist.all_gather_object(gathered, payload, group=self.group)
        return gathered

    def all_sum(self, values: Tensor) -> Tensor:
        """`values` added over all processes (a new tensor on values' device); identity for one."""
        if not self.place.enabled:
            return values
        on = self.device if self.backend == "nccl" else torch.device("cpu")
        total = values.to(on, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total.to(values.device)

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.place.enabled:
            dist.barrier(group=self.group)

    def close(self) -> None:
        """Leave the group this object joined (a caller's own default group is left alone)."""
        if not self.place.enabled:
            return
        if self._owned and dist.is_initialized():
            dist.destroy_process_group()
        elif self.group is not None:
            dist.destroy_process_group(self.group)
        self.group, self._owned = None, False

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:  # every rank done: leave together (gloo aborted a rank that left mid-teardown)
            self.barrier()
        self.close()
