"""bsafuse.torchrun: the placement from torchrun's variables, the device and thread rules, and the
process group (one process: nothing to do; two gloo processes: gather, all_sum, barrier)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bsafuse.errors import DeviceError, InputError
from bsafuse.torchrun import (
    Placement,
    ProcessGroup,
    available_cores,
    device_for,
    placement,
    share_cores,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_are_disjoint_and_cover_every_item(world: int) -> None:
    owners = [[rank for rank in range(world) if Placement(rank, world).owns(i)] for i in range(11)]
    assert owners == [[i % world] for i in range(11)]


def test_the_placement_comes_from_torchruns_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert placement() == Placement() and not Placement().enabled and Placement().is_main
    for name, value in {"RANK": "4", "WORLD_SIZE": "6", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "3"}.items():
        monkeypatch.setenv(name, value)
    assert placement() == Placement(rank=4, world_size=6, local_rank=1, local_world_size=3)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(InputError, match=r"LOCAL_RANK=3 in \[0, LOCAL_WORLD_SIZE=3\)"):
        placement()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(InputError, match="are not integers"):
        placement()


def test_the_device_rule_on_cpus() -> None:
    two = Placement(1, 2, 1, 2)
    assert device_for(Placement(), "cpu") == device_for(two, "cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert device_for(two, "auto") == torch.device("cpu")


def test_the_device_rule_on_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda:LOCAL_RANK for auto and cuda; one named GPU, or more processes than GPUs, is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    second = Placement(3, 4, 1, 2)
    assert device_for(second, "auto") == device_for(second, "cuda") == torch.device("cuda", 1)
    assert device_for(Placement(), "cuda:1") == torch.device("cuda", 1)  # one process: as asked
    with pytest.raises(DeviceError, match=r"--device cuda:1 names one GPU.*use --device auto or cuda"):
        device_for(second, "cuda:1")
    with pytest.raises(DeviceError, match=r"process 2 on this node but only 2 GPU\(s\) are visible"):
        device_for(Placement(2, 3, 2, 3), "auto")


def test_the_thread_rule_shares_the_cores_of_a_node() -> None:
    before = torch.get_num_threads()
    try:
        assert share_cores(Placement()) == before  # one process: left as it is
        assert share_cores(Placement(0, 4, 0, 2)) == max(1, available_cores() // 2)
        assert share_cores(Placement(0, 64, 0, 64 * available_cores())) == 1
    finally:
        torch.set_num_threads(before)


def test_a_single_process_group_does_nothing() -> None:
    with ProcessGroup(Placement(), "cpu") as group:
        values = torch.tensor([1.0, 2.0])
        assert group.gather({"a": 1}) == [{"a": 1}] and group.all_sum(values) is values
        group.barrier()
    assert not dist.is_initialized()
    assert ProcessGroup.for_training(Placement(), "cpu").backend == "gloo"


def _two_ranks(rank: int, ports: tuple[int, int], out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    place = placement()
    results = {}
    with ProcessGroup(place, device_for(place, "cpu")) as group:  # joins: init_process_group
        results["gathered"] = group.gather({"rank": rank})
        results["total"] = group.all_sum(torch.tensor([rank + 1.0])).item()
        group.barrier()
    results["left"] = not dist.is_initialized()
    results["threads"] = torch.get_num_threads()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[1]}", rank=rank, world_size=2)
    with ProcessGroup.for_training(place, "cpu") as group:  # the caller's group: a gloo subgroup
        results["sub_total"] = group.all_sum(torch.tensor([10.0])).item()
    results["caller_kept"] = dist.is_initialized()
    dist.destroy_process_group()
    Path(out, f"{rank}.json").write_text(json.dumps(results))


@pytest.mark.slow
def test_two_gloo_processes_gather_add_and_leave(tmp_path: Path) -> None:
    mp.start_processes(_two_ranks, args=((_free_port(), _free_port()), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        results = json.loads((tmp_path / f"{rank}.json").read_text())
        assert results["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert results["total"] == 3.0 and results["sub_total"] == 20.0
        assert results["left"] and results["caller_kept"]
        assert results["threads"] == max(1, available_cores() // 2)
