"""TrainConfig: everything a training run needs, with the paper's recipe and a quick CPU preset.

`paper` is the recipe of SPEC section 3 (Adam 5e-5 with cosine decay to 5e-7, batch 32, 3000
epochs, lambda 0.5, mu updated every epoch) at the trained size, 256 px.

`quick` trains the `small` model at 64 px so that a run on the Harvard CT-MRI pairs (133 pairs,
116 of them for training with the default split) ends within 15 minutes on a 2-core CPU
(15 steps of 8 pairs per epoch, 110 epochs of about 7 s), with a validation registration error (mean
end-point error against the ground truth) below the error of not registering at all. It is a
demonstration and a smoke test of the whole pipeline, not a model to fuse real images with.
What makes registration learn in that budget (measured on CT-MRI, 2026-11/12):

- the supervised end-point term (LossWeights.flow = 5): with the paper's unsupervised terms
  alone the validation error stayed at the no-registration level after 65 epochs at 1e-4, and
  learning rates of 5e-4 and more pushed the moving image out of view (where the fused image
  falls back to the MRI, the fusion losses are content);
- a learning rate of 1e-3 (cosine to 1e-5) with the gradient norm clipped at 20: with the flow
  term it is stable, and the flow starts to track the deformation after ~200 steps at 128 px.

Deformation amplitudes are given for 256 px and scaled to the working size (data.scaled_deform),
and so is the flow heads' bound (trainer.model_config), so a quick run sees the misalignment the
paper recipe sees, relative to the anatomy.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bsafuse.config import LossWeights
from bsafuse.deform import DeformParams
from bsafuse.device import Precision
from bsafuse.errors import InputError

Preset = Literal["quick", "paper", "residual"]
MODEL_CONFIGS = ("paper", "small")
PRECISIONS = ("fp32", "bf16")
# Options a resumed run may change; everything else must stay as the run was started.
RESUMABLE = frozenset({"epochs", "workers", "device", "precision", "val_every", "data_dir", "run_dir"})


def _training_deform() -> dict[str, Any]:
    return dataclasses.asdict(DeformParams.training())


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Paths are stored as strings so the config travels in checkpoints and JSON."""

    data_dir: str
    run_dir: str
    pair: str | None = None  # e.g. "ct-mri": picks DATA_DIR/CT-MRI when DATA_DIR holds pair folders
    model: str = "paper"  # ModelConfig preset: "paper" or "small"
    image_size: int = 256  # px, working size (a multiple of 16)
    epochs: int = 3000
    batch_size: int = 32  # global: split across processes under torchrun
    lr: float = 5e-5
    lr_min: float = 5e-7  # cosine decay over all epochs ends here
    loss_weights: dict[str, Any] = field(
        default_factory=dict
    )  # LossWeights fields to change (lambda = inten)
    mu_init: float = 1.0  # mu of the first epoch (before any epoch's SSIM sums exist)
    grad_clip: float | None = None  # max gradient norm; None: no clipping (the paper's recipe)
    val_cases: tuple[str, ...] | None = None
    val_fraction: float = 0.15  # share of cases held out when val_cases is not given
    val_every: int = 10  # epochs between validations (the last epoch always validates)
    quality_metrics: bool = True  # also compute Q_AB/F at validation (numpy, a little slower)
    seed: int = 0
    workers: int = 2  # DataLoader worker processes per training process
    device: str = "auto"
    precision: Precision = "fp32"
    deform: dict[str, Any] = field(default_factory=_training_deform)  # DeformParams fields, for 256 px
    # Fine-tune from these weights (registry name or checkpoint path) with a fresh optimiser and
    # schedule; the network's structure comes from them, the working size from image_size.
    init: str | None = None

    def __post_init__(self) -> None:
        def bad(option: str, value: object, want: str) -> InputError:
            return InputError(f"{option} {value!r} is not valid; {want}")

        if self.model not in MODEL_CONFIGS:
            raise bad("--config", self.model, f"use one of {', '.join(MODEL_CONFIGS)}")
        if self.image_size < 16 or self.image_size % 16:
            raise bad("--image-size", self.image_size, "use a multiple of 16 (e.g. 128 or 256)")
        if self.epochs < 1:
            raise bad("--epochs", self.epochs, "use 1 or more")
        if self.batch_size < 1:
            raise bad("--batch-size", self.batch_size, "use 1 or more")
        if not (math.isfinite(self.lr) and self.lr > 0) or not (0 <= self.lr_min <= self.lr):
            raise bad("--lr", self.lr, f"use a positive learning rate at least lr_min ({self.lr_min})")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise bad("--grad-clip", self.grad_clip, "use a positive gradient norm")
        if self.val_every < 1:
            raise bad("--val-every", self.val_every, "use 1 or more")
        if self.workers < 0:
            raise bad("--workers", self.workers, "use 0 (load in the training process) or more")
        if self.seed < 0:
            raise bad("--seed", self.seed, "use a seed >= 0")
        if self.precision not in PRECISIONS:
            raise bad("--precision", self.precision, f"use one of {', '.join(PRECISIONS)}")
        if not 0 <= self.val_fraction < 1:
            raise bad("--val-fraction", self.val_fraction, "use a share in [0, 1)")
        try:
            LossWeights(**self.loss_weights)
        except (TypeError, ValueError) as exc:
            raise InputError(f"loss weights are not valid: {exc}") from None
        try:
            DeformParams(**self.deform)
        except (TypeError, ValueError) as exc:
            raise InputError(f"deformation settings are not valid: {exc}") from None

    @classmethod
    def preset(
        cls, name: Preset, *, data_dir: str | Path, run_dir: str | Path, **overrides: Any
    ) -> TrainConfig:
        """The `paper` or `quick` recipe, with any field overridden (None values are ignored)."""
        if name not in PRESETS:
            raise InputError(f"--preset {name!r} is not valid; use one of {', '.join(PRESETS)}")
        values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(data_dir=str(data_dir), run_dir=str(run_dir), **values)

    @property
    def losses(self) -> LossWeights:
        """The loss weights: the paper's (lambda = 0.5), with `loss_weights` applied."""
        return LossWeights(**self.loss_weights)

    @property
    def deform_params(self) -> DeformParams:
        return DeformParams(**self.deform)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["val_cases"] = list(self.val_cases) if self.val_cases is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("val_cases") is not None:
            values["val_cases"] = tuple(values["val_cases"])
        return cls(**values)

    def resumed_with(self, **overrides: Any) -> TrainConfig:
        """This (stored) config with the options a resumed run may change; others must match."""
        given = {k: v for k, v in overrides.items() if v is not None}
        clashes = [
            f"--{k.replace('_', '-')} {given[k]} (the run has {getattr(self, k)})"
            for k in sorted(given)
            if k not in RESUMABLE and given[k] != getattr(self, k)
        ]
        if clashes:
            raise InputError(
                f"cannot change {'; '.join(clashes)} when resuming; resume without them, "
                "or start a new run in another folder"
            )
        return dataclasses.replace(self, **{k: v for k, v in given.items() if k in RESUMABLE})


PRESETS: dict[str, dict[str, Any]] = {
    # The dataclass defaults are the paper's recipe. Misaligning one 256 px pair costs about 90 ms
    # of one CPU core, so a GPU needs several loader processes to be kept busy at batch 32.
    "paper": {"workers": 8},
    "quick": {
        "model": "small",
        "loss_weights": {"flow": 5.0},  # see LossWeights.flow: registration learns in CPU minutes
        "image_size": 64,
        "epochs": 110,
        "batch_size": 8,
        "lr": 1e-3,
        "lr_min": 1e-5,
        "grad_clip": 20.0,
        "val_every": 5,
        "workers": 0,
    },
    # The recipe of the shipped v2 weights: fine-tune (--init) the small network at 256 px on the
    # misalignment that rigid pre-alignment leaves. Measured on 15 deformed training pairs per
    # type (default deformation, 2026-12-01): rigid leaves a mean end-point error of 5.0 px (CT),
    # 4.1 px (PET) and 8.9 px (SPECT), 95th percentile 7-13 px; this deformation is about that size.
    "residual": {
        "model": "small",
        "loss_weights": {"flow": 5.0},
        "image_size": 256,
        "epochs": 20,
        "batch_size": 8,
        "lr": 5e-4,
        "lr_min": 1e-5,
        "grad_clip": 20.0,
        "val_every": 4,
        "workers": 0,
        "deform": {**_training_deform(), "rotate_deg": 4.0, "translate_px": 5.0, "scale": 0.04},
    },
}
