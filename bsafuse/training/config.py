"""TrainConfig: one typed tree, the recipe (what is trained) and the run settings (where it runs).

    TrainConfig
      recipe   Recipe: model, image_size, epochs, batch_size, lr, lr_min, grad_clip, seed, init,
               pair, val_cases, val_fraction, freeze, fuse (config.FuseConfig or None),
               losses (config.LossWeights), deform (deform.DeformParams, amplitudes for 256 px),
               augment (Augmentation)
      run      RunSettings: data_dir, run_dir, device, precision, workers, val_every

A resumed run keeps its recipe (it may only raise `epochs`) and may change any run setting
(`resumed_with`). Every value is checked when the tree is built (InputError, a ValueError, naming
the setting's path and its command-line option).

Layers: `TrainConfig.preset(name, *layers)` lays partial dicts over a preset, later ones winning;
`bsafuse train` passes the --config-file (TOML, `read_config_file`) and then its options, so
options override the file and the file overrides the preset. On disk (config.json, checkpoints)
the tree is `to_dict()`, nested as above; `from_dict` and every layer also take the flat layout
earlier runs wrote (one key per setting, `loss_weights`, `deform` holding flip and rot90).

The presets (paper, quick, residual) are presets.py's.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from bsafuse.choices import Precision
from bsafuse.config import FuseConfig, LossWeights
from bsafuse.deform import DeformParams
from bsafuse.errors import InputError
from bsafuse.training.presets import PRESETS, ModelSize, Preset
from bsafuse.typed_dicts import build, merge, plain

# The network's parts (BSAFusion's modules) that recipe.freeze may name; the scorer is always frozen.
FREEZABLE = ("encoder", "transfer_a", "transfer_b", "align", "fuse")
MU_INIT = 1.0  # mu of the first epoch, before any epoch's SSIM sums exist (not a setting)
# Settings of the flat layout that are constants now: accepted at these values only.
RETIRED = {"mu_init": MU_INIT, "quality_metrics": True}
# The `bsafuse train` option of each setting that has one (named in messages).
OPTIONS = {
    "recipe.model": "--config",
    "recipe.image_size": "--image-size",
    "recipe.epochs": "--epochs",
    "recipe.batch_size": "--batch-size",
    "recipe.lr": "--lr",
    "recipe.grad_clip": "--grad-clip",
    "recipe.losses.flow": "--flow-weight",
    "recipe.seed": "--seed",
    "recipe.init": "--init",
    "recipe.pair": "--pair",
    "recipe.val_cases": "--val-cases",
    "recipe.val_fraction": "--val-fraction",
    "run.data_dir": "DATA_DIR",
    "run.run_dir": "--output",
    "run.device": "--device",
    "run.precision": "--precision",
    "run.workers": "--workers",
    "run.val_every": "--val-every",
}


def _check(ok: bool, path: str, value: object, want: str) -> None:
    if not ok:
        option = f" ({OPTIONS[path]})" if path in OPTIONS else ""
        raise InputError(f"{path}{option} {value!r} is not valid; {want}")


@dataclass(frozen=True)
class Augmentation:
    """Applied to both images of a training pair alike (never to the validation items)."""

    flip: bool = True  # a random horizontal flip
    rot90: bool = True  # a random multiple of 90 degrees


@dataclass(frozen=True)
class Recipe:
    """What is trained; a resumed run keeps all of it but `epochs`."""

    model: ModelSize = "paper"
    image_size: int = 256  # px, working size (a multiple of 16)
    epochs: int = 3000
    batch_size: int = 32  # global: split across processes under torchrun
    lr: float = 5e-5
    lr_min: float = 5e-7  # cosine decay over all epochs ends here
    grad_clip: float | None = None  # max gradient norm; None: no clipping (the paper's recipe)
    losses: LossWeights = field(default_factory=LossWeights)  # lambda of Eq. 14 is losses.inten
    # Misalignment amplitudes for 256 px (scaled to image_size); flip and rot90 are `augment`'s.
    deform: DeformParams = field(default_factory=DeformParams)
    augment: Augmentation = field(default_factory=Augmentation)
    # A curriculum of deformation size: the amplitudes grow linearly over the first N epochs,
    # from 1/N of `deform` in the first to all of it in the N-th (data.MisalignedPairs); 0: off.
    curriculum_epochs: int = 0
    seed: int = 0  # of the split, the deformations and the initial weights
    # Fine-tune from these weights (registry name or checkpoint path) with a fresh optimiser and
    # schedule; the network's structure comes from them, the working size from image_size.
    init: str | None = None
    pair: str | None = None  # e.g. "ct-mri": picks DATA_DIR/CT-MRI when DATA_DIR holds pair folders
    val_cases: tuple[str, ...] | None = None  # validation cases; None: drawn with val_fraction
    val_fraction: float = 0.15  # share of cases held out when val_cases is not given
    # Parts of the network that keep their weights (see FREEZABLE): e.g. the registration half
    # (encoder, transfer_a, transfer_b, align) while the fusion trains; () trains everything.
    freeze: tuple[str, ...] = ()
    # The fusion (MMFF) widths, where they differ from the network's (model or init): the fusion
    # is then built fresh at these widths and, with init, every other part comes from init.
    # A change of `anchor` alone keeps every weight (training/network.py `initial_model`).
    fuse: FuseConfig | None = None

    def __post_init__(self) -> None:
        if self.val_cases is not None:
            object.__setattr__(self, "val_cases", tuple(self.val_cases))
        object.__setattr__(self, "freeze", tuple(self.freeze))
        unknown = [name for name in self.freeze if name not in FREEZABLE]
        _check(not unknown, "recipe.freeze", list(self.freeze), f"name parts of {', '.join(FREEZABLE)}")
        for name, kind in (("losses", LossWeights), ("deform", DeformParams), ("augment", Augmentation)):
            value = getattr(self, name)
            _check(isinstance(value, kind), f"recipe.{name}", value, f"use a {kind.__name__}")
        fuse_ok = self.fuse is None or isinstance(self.fuse, FuseConfig)
        _check(fuse_ok, "recipe.fuse", self.fuse, "use a FuseConfig (channels, heads)")
        sizes = get_args(ModelSize)
        _check(self.model in sizes, "recipe.model", self.model, f"use {' or '.join(sizes)}")
        size_ok = self.image_size >= 16 and self.image_size % 16 == 0
        _check(size_ok, "recipe.image_size", self.image_size, "use a multiple of 16 (e.g. 128 or 256)")
        _check(self.epochs >= 1, "recipe.epochs", self.epochs, "use 1 or more")
        _check(self.batch_size >= 1, "recipe.batch_size", self.batch_size, "use 1 or more")
        _check(0 <= self.lr_min, "recipe.lr_min", self.lr_min, "use 0 or more")
        lr_ok = math.isfinite(self.lr) and self.lr > 0 and self.lr >= self.lr_min
        want_lr = f"use a positive learning rate of at least lr_min ({self.lr_min:g})"
        _check(lr_ok, "recipe.lr", self.lr, want_lr)
        clip = self.grad_clip
        clip_ok = clip is None or (math.isfinite(clip) and clip > 0)
        _check(clip_ok, "recipe.grad_clip", clip, "use a positive gradient norm")
        ramp = self.curriculum_epochs
        ramp_ok = isinstance(ramp, int) and ramp >= 0
        _check(ramp_ok, "recipe.curriculum_epochs", ramp, "use 0 (off) or a number of epochs")
        _check(self.seed >= 0, "recipe.seed", self.seed, "use a seed >= 0")
        _check(0 <= self.val_fraction < 1, "recipe.val_fraction", self.val_fraction, "use a share in [0, 1)")
        for name in ("flip", "rot90"):
            on = getattr(self.deform, name)
            _check(not on, f"recipe.deform.{name}", on, f"augmentation is set as recipe.augment.{name}")

    @property
    def training_deform(self) -> DeformParams:
        """What data.MisalignedPairs takes: the deformation amplitudes with the augmentation."""
        return dataclasses.replace(self.deform, flip=self.augment.flip, rot90=self.augment.rot90)


@dataclass(frozen=True)
class RunSettings:
    """Where and how this run executes; a resumed run may change any of it."""

    data_dir: str  # paths are strings, so the config travels in checkpoints and JSON
    run_dir: str
    device: str = "auto"
    precision: Precision = "fp32"
    workers: int = 2  # DataLoader worker processes per training process
    val_every: int = 10  # epochs between validations (the last epoch always validates)

    def __post_init__(self) -> None:
        kinds = get_args(Precision)
        _check(self.precision in kinds, "run.precision", self.precision, f"use {' or '.join(kinds)}")
        _check(self.workers >= 0, "run.workers", self.workers, "use 0 (load in the training process) or more")
        _check(self.val_every >= 1, "run.val_every", self.val_every, "use 1 or more")


@dataclass(frozen=True)
class TrainConfig:
    """A training run: its recipe and its run settings."""

    recipe: Recipe
    run: RunSettings

    def __post_init__(self) -> None:
        _check(isinstance(self.recipe, Recipe), "recipe", self.recipe, "use a Recipe")
        _check(isinstance(self.run, RunSettings), "run", self.run, "use a RunSettings")

    @classmethod
    def preset(
        cls,
        name: Preset,
        *layers: Mapping[str, Any] | None,
        data_dir: str | Path | None = None,
        run_dir: str | Path | None = None,
    ) -> TrainConfig:
        """Preset `name` with each layer laid over it (later layers win; None values are not given).

        A layer is a partial config dict, nested or flat; `data_dir` and `run_dir` come last.
        """
        if name not in PRESETS:
            raise InputError(f"--preset {name!r} is not valid; use one of {', '.join(PRESETS)}")
        paths = {"run": {"data_dir": _str(data_dir), "run_dir": _str(run_dir)}}
        return cls.from_dict(merge(PRESETS[name], *map(nested, layers), paths))

    def to_dict(self) -> dict[str, Any]:
        """The nested layout: plain dicts and lists, safe for JSON and checkpoints."""
        data: dict[str, Any] = plain(self)
        for name in ("flip", "rot90"):  # always off here: augmentation is recipe.augment
            del data["recipe"]["deform"][name]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; also reads the flat layout; left-out settings take their defaults."""
        return build(cls, merge({"recipe": {}}, nested(data)))

    def resumed_with(self, *layers: Mapping[str, Any] | None) -> TrainConfig:
        """This (stored) config with layers laid over it; the recipe may change only its epochs."""
        resumed = TrainConfig.from_dict(merge(self.to_dict(), *map(nested, layers)))
        clashes = [
            f"{path}{f' ({OPTIONS[path]})' if path in OPTIONS else ''} to {new!r} (the run has {old!r})"
            for path, old, new in _differences("recipe", plain(self.recipe), plain(resumed.recipe))
            if path != "recipe.epochs"
        ]
        if clashes:
            raise InputError(
                f"cannot change {'; '.join(clashes)} when resuming; resume without them, "
                "or start a new run in another folder"
            )
        return resumed


def nested(layer: Mapping[str, Any] | None) -> dict[str, Any]:
    """A (partial) config dict in the nested layout; a flat one, as older runs wrote, is converted."""
    if not layer:
        return {}
    if set(layer) <= {"recipe", "run"}:
        return dict(layer)
    if set(layer) & {"recipe", "run"}:
        raise InputError(
            f"a training config is either nested (recipe, run) or flat, not both: got {', '.join(layer)}"
        )
    sections = {"recipe": _names(Recipe), "run": _names(RunSettings)}
    tree: dict[str, dict[str, Any]] = {"recipe": {}, "run": {}}
    for key, value in layer.items():
        if key == "loss_weights":
            tree["recipe"]["losses"] = value
        elif key == "deform" and isinstance(value, Mapping):
            tree["recipe"]["deform"] = {k: v for k, v in value.items() if k not in ("flip", "rot90")}
            tree["recipe"]["augment"] = {k: v for k, v in value.items() if k in ("flip", "rot90")}
        elif key in RETIRED:
            if value != RETIRED[key]:
                fixed = f"{key} = {RETIRED[key]!r}"
                raise InputError(f"{key} {value!r} is no longer a setting; training uses {fixed}")
        else:
            section = next((s for s, names in sections.items() if key in names), None)
            if section is None:
                raise InputError(f"the training config has no setting {key!r}")
            tree[section][key] = value
    return tree


def recipe_of(stored: Mapping[str, Any]) -> Recipe:
    """The recipe of a stored training config in either layout (a checkpoint's train["config"]),
    e.g. for the validation split of the run that wrote a checkpoint."""
    return build(Recipe, nested(stored).get("recipe", {}), where="recipe")


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML config file (nested with [recipe], [run] tables, or flat) as a layer."""
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise InputError(f"cannot read the config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path} is not a valid TOML file: {exc}") from None
    try:
        return nested(data)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def _differences(path: str, old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """(path, old, new) of every leaf where two plain trees differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in old for d in _differences(f"{path}.{key}", old[key], new.get(key))]
    return [] if old == new else [(path, old, new)]


def _names(kind: type) -> set[str]:
    return {f.name for f in dataclasses.fields(kind)}


def _str(path: str | Path | None) -> str | None:
    return None if path is None else str(path)
