"""The data of a training run: the pairs read once, split by case, misaligned on the fly, loaded.

Each process of a torchrun job loads every pair but trains on its share of each global batch
(data.EpochSampler) and validates on its share of the validation items (every world_size-th).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader

from bsafuse import data as data_mod
from bsafuse.torchrun import Placement
from bsafuse.training.config import TrainConfig


@dataclass(frozen=True)
class RunData:
    """The training set and its loader, and this process's validation items."""

    train_set: data_mod.MisalignedPairs
    val_set: data_mod.MisalignedPairs
    val_items: dict[str, Tensor]  # this process's share, materialised once (fixed deformations)
    split: dict[str, Any]  # folders and the names of the training and validation pairs
    local_batch: int  # this process's share of the global batch
    sampler: data_mod.EpochSampler
    loader: DataLoader[dict[str, Tensor]]

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps(self.local_batch)


def load_run_data(config: TrainConfig, place: Placement, *, pin_memory: bool = False) -> RunData:
    """Read the pairs of `config`, split them by case, and set up the sampler and the loader."""
    recipe, workers = config.recipe, config.run.workers
    moving_dir, fixed_dir = data_mod.find_pair_folder(Path(config.run.data_dir), recipe.pair)
    names = data_mod.list_pairs(moving_dir, fixed_dir)
    train_names, val_names = data_mod.split_by_case(
        names, val_cases=recipe.val_cases, val_fraction=recipe.val_fraction, seed=recipe.seed
    )
    pairs = data_mod.load_pairs(moving_dir, fixed_dir, names, image_size=recipe.image_size)
    params = data_mod.scaled_deform(recipe.training_deform, recipe.image_size)
    train_set = data_mod.MisalignedPairs(
        pairs.subset(train_names),
        params=params,
        seed=recipe.seed,
        train=True,
        ramp_epochs=recipe.curriculum_epochs,
    )
    val_set = data_mod.MisalignedPairs(pairs.subset(val_names), params=params, seed=recipe.seed, train=False)
    local_batch = max(1, recipe.batch_size // place.world_size)
    sampler = data_mod.EpochSampler(
        len(train_set), rank=place.rank, world_size=place.world_size, seed=recipe.seed
    )
    loader = DataLoader(
        train_set,
        batch_size=local_batch,
        sampler=sampler,
        num_workers=workers,
        # Not persistent: each epoch's workers end with its iterator. They ignore SIGTERM (so a
        # signal to the process group stops training in order, data.ignore_sigint), so they must
        # not outlive the loop, where multiprocessing's exit would SIGTERM and wait for them.
        persistent_workers=False,
        pin_memory=pin_memory,
        worker_init_fn=data_mod.ignore_sigint if workers > 0 else None,
    )
    return RunData(
        train_set=train_set,
        val_set=val_set,
        val_items=val_set.materialise(range(place.rank, len(val_names), place.world_size)),
        split={"moving_dir": str(moving_dir), "fixed_dir": str(fixed_dir), "train": train_names, "val": val_names},
        local_batch=local_batch,
        sampler=sampler,
        loader=loader,
    )
