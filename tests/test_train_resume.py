"""`bsafuse train` survives a SIGKILL (resume from last.pt) and stops cleanly on Ctrl-C (SIGINT).

Each test runs `python -m bsafuse train` in a subprocess on a tiny synthetic data folder (small
model, 32 px) and watches metrics.csv / last.pt to know which epoch it is in.
"""

from __future__ import annotations

import contextlib
import csv
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_data import make_folder

from bsafuse import data as data_mod
from bsafuse.errors import WeightsError
from bsafuse.weights import load_checkpoint, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
# 12 training pairs at batch 2: 6 steps per epoch (0.3 to 1 s on 2 CPU cores).
NAMES = [f"{case}{s:03d}" for case in (1, 2, 3, 4) for s in range(1, 4)] + ["5001", "5002"]
TRAIN_ARGS = "--preset quick --image-size 32 --batch-size 2 --workers 0 --val-cases 5 --val-every 1 --device cpu --seed 3".split()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "CT-MRI", NAMES, size=32)


def _start(*args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    return subprocess.Popen(
        [sys.executable, "-m", "bsafuse", "train", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _epochs_logged(run: Path) -> int:
    try:
        with (run / "metrics.csv").open(newline="") as f:
            return len(list(csv.DictReader(f)))
    except FileNotFoundError:
        return 0


def _saved_epoch(run: Path) -> int:
    try:
        return int(read_checkpoint(run / "last.pt")["epoch"])
    except WeightsError:  # not written yet (it appears atomically, whole)
        return 0


def _wait_for(condition: object, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"training exited early ({proc.returncode}):\n{err.decode()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for training progress")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_during_epoch_3_then_resume_finishes_the_run(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start(str(tiny_data), "-o", str(run), "--epochs", "4", *TRAIN_ARGS)
    _wait_for(lambda: _saved_epoch(run) >= 2, proc)
    time.sleep(0.05)  # last.pt of epoch 2 is written: the run is in epoch 3 now
    logged_at_kill = _epochs_logged(run)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert logged_at_kill == 2, "the kill should land in epoch 3; make the epochs longer"

    resumed = _start("--resume", str(run / "last.pt"))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-3000:]
    with (run / "metrics.csv").open(newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3", "4"]
    last = read_checkpoint(run / "last.pt")
    assert (last["epoch"], last["step"]) == (4, 0)
    model = load_checkpoint(run / "best.pt")
    assert model.config.image_size == 32
    assert not list(run.glob(".*.tmp")), "no temporary checkpoint files are left behind"


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start(str(tiny_data), "-o", str(run), "--epochs", "50", *TRAIN_ARGS)
    _wait_for(lambda: _saved_epoch(run) >= 1, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    text = err.decode()
    assert proc.returncode == 130, text[-3000:]
    assert "Traceback" not in text
    assert "stopped in epoch" in text and "--resume" in text
    saved = read_checkpoint(run / "last.pt")
    assert saved["epoch"] >= 1 and saved["epoch"] < 50
    assert _epochs_logged(run) == saved["epoch"]
    load_checkpoint(run / "last.pt")  # a usable model


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_saves_and_exits(tiny_data: Path, tmp_path: Path) -> None:
    """How `timeout` and job schedulers stop a job: SIGTERM to every process, loader workers included."""
    run = tmp_path / "run"
    args = " ".join(TRAIN_ARGS).replace("--workers 0", "--workers 2").split()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bsafuse", "train", str(tiny_data), "-o", str(run), "--epochs", "50", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: _saved_epoch(run) >= 1, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:  # whatever failed above, leave no training process (or loader worker) behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = err.decode()
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "Traceback" not in text and "DataLoader" not in text
    assert "stopped in epoch" in text
    assert 1 <= read_checkpoint(run / "last.pt")["epoch"] < 50


def _worker_in_the_window(ready: Any) -> None:
    """A loader worker between torch's handler setup and worker_init_fn: SIGTERM would kill it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ready.set()
    time.sleep(0.5)  # the parent signals meanwhile (no lock shared with it: a dead worker hangs none)
    data_mod.ignore_sigint(0)  # the worker_init_fn: ignore, then unblock (a pending SIGTERM is dropped)


def test_a_worker_born_with_stop_signals_blocked_survives_sigterm_before_its_init() -> None:
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    with data_mod.stop_signals_blocked():
        worker = context.Process(target=_worker_in_the_window, args=(ready,))
        worker.start()
    try:
        assert ready.wait(10)
        os.kill(worker.pid, signal.SIGTERM)  # type: ignore[arg-type]
        worker.join(10)
    finally:
        if worker.is_alive():
            worker.kill()
    assert worker.exitcode == 0  # without the blocked mask it dies of SIGTERM (-15)
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the main's mask is back
