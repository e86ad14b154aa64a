"""The training state: what a checkpoint carries beside the weights, and the optimiser it restores.

Checkpoints go through `bsafuse.weights.save_checkpoint` (temporary file + os.replace, so a kill
never leaves a truncated file) in the one format `bsafuse fuse --weights` reads. The training
state rides along as plain data (`torch.load(weights_only=True)` reads it):

    epoch       completed epochs (the epoch counter continues from here)
    step        optimizer steps already taken in epoch `epoch` + 1 (0 at an epoch boundary;
                more after a Ctrl-C mid-epoch)
    optimizer, scheduler, mu, rng, metrics (the last epoch's row and the best validation EPE)
    train       {"config": TrainConfig.to_dict(), "partial": sums of the unfinished epoch,
                 "world_size": processes that wrote it}

The optimiser is Adam over the trainable parameters with a cosine schedule per epoch, from
recipe.lr down to recipe.lr_min after the last epoch (design.md §3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bsafuse.model import BSAFusion
from bsafuse.training.config import MU_INIT, Recipe, TrainConfig
from bsafuse.weights import save_checkpoint


@dataclass
class TrainState:
    """Where a run stands, beside its weights and optimiser."""

    epoch: int = 0  # completed epochs
    step: int = 0  # steps already done in the next epoch
    mu: float = MU_INIT
    partial: dict[str, float] = field(default_factory=dict)  # sums of the unfinished epoch
    best_val_epe: float | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)  # the last metrics.csv row

    @classmethod
    def from_checkpoint(cls, data: Mapping[str, Any], *, is_main: bool) -> TrainState:
        """The state a checkpoint holds; only rank 0 takes the unfinished epoch's sums (the other
        processes start them at zero, as the sums are added over processes)."""
        metrics = data.get("metrics") or {}
        partial = (data.get("train") or {}).get("partial") or {}
        return cls(
            epoch=int(data["epoch"]),
            step=int(data.get("step", 0)),
            mu=float(data["mu"]),
            partial=dict(partial) if is_main else {},
            best_val_epe=metrics.get("best_val_epe"),
            last_metrics=dict(metrics.get("last") or {}),
        )


def adam(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """torch's Adam, as its fused kernel where this torch has one for the device (CPU from torch 2.4):
    one pass over each tensor instead of a dozen small ops (a paper-config step on 2 cores: 63 ->
    26 ms). The same update up to float rounding; checkpoints load either way."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # older torch, or a device without the fused kernel
        return torch.optim.Adam(params, lr=lr)


class Optimisation:
    """Adam with the cosine schedule of `recipe`, over the trainable parameters of `model`."""

    def __init__(self, model: torch.nn.Module, recipe: Recipe) -> None:
        self.recipe = recipe
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = adam(trainable, recipe.lr)
        # a lambda, not the bound method: LambdaLR then keeps nothing of it in its state_dict
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: self.lr_factor(e))

    def lr_factor(self, epoch: int) -> float:
        """Cosine decay from lr (epoch 0) to lr_min (after the last epoch), as a factor of lr."""
        floor, total = self.recipe.lr_min / self.recipe.lr, self.recipe.epochs
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(epoch, total) / total))

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def restore(self, data: Mapping[str, Any]) -> None:
        """The optimiser and schedule of a checkpoint, on the (maybe longer) schedule of this recipe."""
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self.lr_factor(self.scheduler.last_epoch)  # --epochs may have changed


def save_state(
    path: Path,
    model: BSAFusion,
    *,
    state: TrainState,
    optimisation: Optimisation,
    config: TrainConfig,
    world_size: int,
) -> Path:
    """Write a checkpoint of `model` with the whole training state (atomically)."""
    save_checkpoint(
        path,
        model,
        epoch=state.epoch,
        step=state.step,
        optimizer=optimisation.optimizer.state_dict(),
        scheduler=optimisation.scheduler.state_dict(),
        mu=state.mu,
        rng={"seed": config.recipe.seed, "torch": torch.get_rng_state()},
        metrics={"best_val_epe": state.best_val_epe, "last": state.last_metrics},
        train={"config": config.to_dict(), "partial": state.partial, "world_size": world_size},
    )
    return path
