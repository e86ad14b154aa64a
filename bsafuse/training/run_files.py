"""The files of a run folder: config.json, metrics.csv, last.pt and best.pt.

config.json records the run: {"train": TrainConfig.to_dict() (the nested recipe/run tree),
"model": ModelConfig.to_dict(), "data": the folders and the split, world_size, device, ...}.
Checkpoints (last.pt, best.pt) and the training state they carry are state.py's.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bsafuse.errors import InputError, OutputError
from bsafuse.io.atomic import atomic_path
from bsafuse.training.config import TrainConfig
from bsafuse.weights import read_checkpoint

LAST, BEST, METRICS, CONFIG = "last.pt", "best.pt", "metrics.csv", "config.json"


def write_atomic(path: Path, text: str) -> None:
    """Write text to a temporary file beside `path`, then rename it into place (io.atomic)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    write_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def prepare_run_dir(run_dir: Path, *, resuming: bool) -> None:
    """Create the run folder; refuse to start a fresh run over an existing one."""
    if not resuming and (run_dir / LAST).exists():
        raise OutputError(
            f"{run_dir} already holds a run ({LAST}); resume it with --resume {run_dir / LAST}, "
            "or pick another -o folder"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the run folder {run_dir}: {exc.strerror}") from None


class MetricsLog:
    """metrics.csv, one row per epoch; a resumed run drops rows past its checkpoint first."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path, self.columns = path, list(columns)

    def truncate_after(self, epoch: int) -> None:
        """Keep only the rows of epochs <= `epoch` (rows a killed run wrote after its checkpoint)."""
        if not self.path.exists():
            return
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            self.columns = list(reader.fieldnames or self.columns)
            rows = [r for r in reader if r.get("epoch") and int(r["epoch"]) <= epoch]
        self._rewrite(rows)

    def append(self, row: Mapping[str, Any]) -> None:
        if not self.path.exists():
            self._rewrite([])
        buffer = io.StringIO()
        csv.DictWriter(buffer, self.columns, extrasaction="ignore").writerow(
            {k: _cell(v) for k, v in row.items()}
        )
        with self.path.open("a", encoding="utf-8", newline="") as f:
            f.write(buffer.getvalue())
            f.flush()

    def _rewrite(self, rows: Sequence[Mapping[str, Any]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.path, buffer.getvalue())


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def read_resume(path: str | os.PathLike[str]) -> tuple[TrainConfig, dict[str, Any]]:
    """(the run's TrainConfig, the checkpoint dict) of a checkpoint written by the trainer."""
    data = read_checkpoint(path)
    train = data.get("train")
    if not isinstance(train, dict) or "config" not in train or "epoch" not in data:
        raise InputError(
            f"{path} holds model weights but no training state (it was not written by `bsafuse train`); "
            "it can be used with --weights, but not resumed"
        )
    try:
        config = TrainConfig.from_dict(train["config"])  # the nested layout, or the flat one of older runs
    except ValueError as exc:
        raise InputError(f"{path} has a training config this bsafuse cannot read: {exc}") from None
    return config, data
