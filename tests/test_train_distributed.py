"""`torchrun -m bsafuse train`: two CPU processes (gloo) give the results of one process.

One process with a global batch of 4 and two processes with 2 each see the same samples in every
step (data.EpochSampler), and DistributedDataParallel averages the two halves' gradients, so the
logged losses agree up to float arithmetic.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_data import make_folder

from bsafuse.weights import load_checkpoint, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
NAMES = ["1001", "1002", "2001", "2002", "3001", "3002", "4001", "4002", "5001", "5002"]
ARGS = "--preset quick --image-size 32 --batch-size 4 --epochs 2 --workers 0 --val-cases 5 --val-every 1 --device cpu --seed 1".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "CT-MRI", NAMES, size=32)
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"}
    single, double = tmp_path / "one", tmp_path / "two"
    one = subprocess.run(
        [sys.executable, "-m", "bsafuse", "train", str(data), "-o", str(single), *ARGS],
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        timeout=120,
    )
    assert one.returncode == 0, one.stderr.decode()[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            "-m",
            "bsafuse",
            "train",
            str(data),
            "-o",
            str(double),
            *ARGS,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert two.returncode == 0, two.stderr.decode()[-3000:]

    a, b = _rows(single), _rows(double)
    assert [r["epoch"] for r in b] == ["1", "2"]  # rank 0 alone writes: no duplicate rows
    for ra, rb in zip(a, b, strict=True):
        for column in (
            "lr",
            "mu",
            "train_total",
            "train_consis",
            "train_struct",
            "val_epe",
            "val_epe_none",
            "val_total",
        ):
            assert float(rb[column]) == pytest.approx(float(ra[column]), rel=2e-3, abs=1e-4), column
    assert read_checkpoint(double / "last.pt")["train"]["world_size"] == 2
    load_checkpoint(double / "best.pt")
    assert two.stderr.decode().count("done") == 1  # progress and messages from rank 0 only
