"""Training BSAFusion: `Trainer` and `TrainConfig` (the command line is `bsafuse train`).

    from bsafuse.training import TrainConfig, Trainer
    config = TrainConfig.preset("quick", data_dir="data/CT-MRI", run_dir="runs/ct-mri")
    result = Trainer(config, callback=print).fit()   # writes runs/ct-mri/{config.json,metrics.csv,last.pt,best.pt}

Modules, each importing only those above it:

    presets      the named recipes (paper, quick, residual) and the model sizes (torch-free)
    typed_dicts  plain dicts <-> dataclass trees, checked against the type hints
    config       TrainConfig = Recipe + RunSettings; layers (TOML file, options); the flat layout
    objective    L_total of a batch under the run's precision; epoch sums
    validation   validate(model, items, ...): the scores of each validated epoch
    network      the run's network: fresh, fine-tuned (--init) or resumed
    run_data     the pairs, the split by case, the loader
    state        the training state in checkpoints; the optimiser and its schedule
    run_files    the run folder: config.json, metrics.csv; read_resume
    trainer      the epoch loop

torchrun (process groups, devices, cores) is bsafuse.torchrun, shared with folder runs of `fuse`.
The names below are imported lazily, so `import bsafuse.training.presets` does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bsafuse._lazy import lazy_attributes

if TYPE_CHECKING:
    from bsafuse.training.config import Recipe, RunSettings, TrainConfig
    from bsafuse.training.presets import PRESETS
    from bsafuse.training.run_files import read_resume
    from bsafuse.training.trainer import FitResult, Trainer, TrainEvent

__all__ = ["PRESETS", "FitResult", "Recipe", "RunSettings", "TrainConfig", "TrainEvent", "Trainer", "read_resume"]

_HOMES = {
    "PRESETS": "bsafuse.training.presets",
    "Recipe": "bsafuse.training.config",
    "RunSettings": "bsafuse.training.config",
    "TrainConfig": "bsafuse.training.config",
    "read_resume": "bsafuse.training.run_files",
    "FitResult": "bsafuse.training.trainer",
    "TrainEvent": "bsafuse.training.trainer",
    "Trainer": "bsafuse.training.trainer",
}


__getattr__ = lazy_attributes(__name__, _HOMES)
