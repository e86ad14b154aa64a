"""Folder runs: the streaming pipeline (bounded, ordered, overlapping) and torchrun sharding.

The placement rules themselves (shards, devices, cores) are tested in test_torchrun.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bsafuse.errors import InputError
from bsafuse.pipeline import stream

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
CT, MRI = EXAMPLES / "CT-MRI" / "CT", EXAMPLES / "CT-MRI" / "MRI"


# -------------------------------------------------------------------------------- pipeline


def test_reading_computing_and_writing_overlap() -> None:
    """While job 0 computes, job 1 is read; while job 1 computes, job 0 is written."""
    started = {("read", 1): threading.Event(), ("write", 0): threading.Event()}
    seen: dict[int, bool] = {}

    def read(job: int) -> int:
        if ("read", job) in started:
            started[("read", job)].set()
        return job * 10

    def compute(job: int, loaded: int) -> int:
        waits_for = {0: ("read", 1), 1: ("write", 0)}.get(job)
        if waits_for is not None:  # a sequential loop would never set the event: False
            seen[job] = started[waits_for].wait(timeout=10)
        return loaded + 1

    def write(job: int, result: int) -> None:
        if ("write", job) in started:
            started[("write", job)].set()

    done = list(stream(range(4), read=read, compute=compute, write=write, recoverable=(InputError,)))
    assert [d.job for d in done] == [0, 1, 2, 3] and all(d.error is None for d in done)
    assert seen == {0: True, 1: True}


def test_memory_stays_bounded_and_outcomes_keep_their_order() -> None:
    """However many jobs, at most prefetch + write_behind + 2 are held at once; errors stay in place."""
    lock = threading.Lock()
    alive = [0, 0]  # now, peak

    def read(job: int) -> int:
        if job == 5:
            raise InputError("job 5 is unreadable")
        with lock:
            alive[0] += 1
            alive[1] = max(alive)
        return job

    def write(job: int, result: int) -> None:
        with lock:
            alive[0] -= 1

    done = list(
        stream(
            range(40),
            read=read,
            compute=lambda j, x: x,
            write=write,
            recoverable=(InputError,),
            prefetch=2,
            write_behind=2,
        )
    )
    assert [d.job for d in done] == list(range(40))
    assert [d.job for d in done if d.error is not None] == [5]
    assert str(done[5].error) == "job 5 is unreadable"
    assert alive[0] == 0 and 2 <= alive[1] <= 6


def test_an_unexpected_error_stops_the_pipeline_and_its_queued_reads() -> None:
    reads: list[int] = []

    def compute(job: int, loaded: int) -> int:
        if job == 3:
            raise RuntimeError("a bug")
        return loaded

    with pytest.raises(RuntimeError, match="a bug"):
        list(stream(range(100), read=lambda j: reads.append(j) or j, compute=compute, write=lambda j, r: None,
                    recoverable=(InputError,), prefetch=2))  # fmt: skip
    assert max(reads) <= 3 + 2  # nothing beyond the read-ahead window was started


# ------------------------------------------------------------------------ torchrun, 2 processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_fuse(tmp_path: Path, checkpoint: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "bsafuse", "fuse", "ct", "mri", "-o", "out", "--weights", str(checkpoint), "--device", "cpu",
        "--json", *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_share_a_folder_without_overlap(tmp_path: Path, tiny_checkpoint: Path) -> None:
    (tmp_path / "ct").mkdir()
    (tmp_path / "mri").mkdir()
    names = [f"case{i}.png" for i in range(5)]
    for i, name in enumerate(names):
        source = sorted(CT.glob("*.png"))[i % 2].name
        shutil.copy(CT / source, tmp_path / "ct" / name)
        shutil.copy(MRI / source, tmp_path / "mri" / name)

    first = torchrun_fuse(tmp_path, tiny_checkpoint)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout)  # rank 0 alone prints: one JSON document
    assert (summary["ok"], summary["skipped"], summary["failed"], summary["processes"]) == (5, 0, 0, 2)
    pairs = summary["pairs"]
    assert [Path(p["output"]).name for p in pairs] == names
    assert [p["rank"] for p in pairs] == [0, 1, 0, 1, 0]  # sorted index modulo the world size
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names  # no temporary files left

    again = torchrun_fuse(tmp_path, tiny_checkpoint)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert (summary["ok"], summary["skipped"]) == (0, 5)
    assert [p["rank"] for p in summary["pairs"]] == [0, 1, 0, 1, 0]
