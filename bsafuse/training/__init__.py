"""Training BSAFusion: `Trainer` and `TrainConfig` (the command line is `bsafuse train`).

    from bsafuse.training import TrainConfig, Trainer
    config = TrainConfig.preset("quick", data_dir="data/CT-MRI", run_dir="runs/ct-mri")
    result = Trainer(config, callback=print).fit()   # writes runs/ct-mri/{config.json,metrics.csv,last.pt,best.pt}

Modules: config (TrainConfig, presets), trainer (the loop), validation (scores per epoch),
run_files (checkpoints, metrics.csv, config.json), distributed (torchrun process groups).
"""

from __future__ import annotations

from bsafuse.training.config import PRESETS, TrainConfig
from bsafuse.training.run_files import read_resume
from bsafuse.training.trainer import FitResult, Trainer, TrainEvent

__all__ = ["PRESETS", "FitResult", "TrainConfig", "TrainEvent", "Trainer", "read_resume"]
