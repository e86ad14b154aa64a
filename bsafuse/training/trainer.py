"""Trainer: BSAFusion's training loop (SPEC section 3), one process or many under torchrun.

Per epoch: train on freshly misaligned pairs (data.MisalignedPairs), update mu from the epoch's
SSIM sums (losses.update_mu), re-copy the modality scorer (model.refresh_modality_scorer), step
the cosine schedule, validate every `val_every` epochs, and write metrics.csv, last.pt and, when
the validation end-point error improves, best.pt. The trainer never prints: it reports through a
callback (the command line renders a progress bar from it).

Reproducibility: data randomness comes from per-item generators seeded by (seed, epoch, index),
and model initialisation and each epoch's own randomness (dropout, if any) from generators forked
off (seed, epoch, rank), never from the caller's global state. So a run resumed from last.pt at an
epoch boundary continues exactly as if it had not stopped; a run stopped mid-epoch with
`request_stop()` (Ctrl-C) saves its step and sums and resumes at the next batch of that epoch.

Under torchrun every process runs this loop with its share of each global batch (batch_size is the
global batch); DistributedDataParallel averages the gradients, the epoch sums are added over
processes, and validation is split across processes and summed. Rank 0 alone writes files and
calls the callback.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from bsafuse import data as data_mod
from bsafuse._version import __version__
from bsafuse.config import ModelConfig
from bsafuse.data import REFERENCE_SIZE
from bsafuse.device import autocast_for
from bsafuse.losses import LOSS_TERMS, SUMMARY_TERMS, total_loss, update_mu
from bsafuse.model import BSAFusion
from bsafuse.model.bsafusion import FusionOutput
from bsafuse.training import run_files
from bsafuse.training.config import TrainConfig
from bsafuse.training.distributed import Distributed, all_sum
from bsafuse.training.validation import VAL_COLUMNS, validate
from bsafuse.weights import load_checkpoint, save_checkpoint

EventKind = Literal["start", "step", "epoch", "stopped", "done"]


@dataclass(frozen=True)
class TrainEvent:
    """What the trainer reports. `epoch` is 1-based: the epoch in progress, or just finished."""

    kind: EventKind
    epoch: int
    epochs: int
    step: int = 0  # steps done in this epoch
    steps: int = 0  # steps in a full epoch
    loss: float | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)  # the metrics.csv row ("epoch" events)
    path: Path | None = None  # checkpoint written ("epoch", "stopped")


@dataclass(frozen=True)
class FitResult:
    epochs_done: int
    stopped: bool  # True when request_stop() ended the run early
    best_val_epe: float | None
    last_metrics: Mapping[str, Any]


def model_config(name: str, image_size: int) -> ModelConfig:
    """The `paper` or `small` ModelConfig, built for `image_size`.

    The flow heads' bound (AlignConfig.max_step, pixels per step at that step's scale) scales with
    the working size, so the largest correctable offset keeps the share of the image it has at
    256 px (62 px): about 15 px at 64 px. With the full 62 px at a small size, one large update
    of a coarse flow head can move the whole moving image out of view, where the warp reads only
    zeros and L_consis has no gradient left to bring it back (training collapses for good).
    """
    base = ModelConfig.paper() if name == "paper" else ModelConfig.small()
    align = dataclasses.replace(base.align, max_step=base.align.max_step * image_size / REFERENCE_SIZE)
    return dataclasses.replace(base, image_size=image_size, align=align)


def initial_model(weights: str, image_size: int) -> BSAFusion:
    """The network of `weights` (registry name or path), rebuilt for `image_size`, for fine-tuning.

    The structure (channels, heads, depths) is the checkpoint's; the working size and the flow
    heads' bound follow `image_size` as in `model_config`. The learned positional map is resized
    to the new working size (bilinear, as the encoder itself does for other input sizes).
    """
    from bsafuse.weights import read_checkpoint, resolve

    data = read_checkpoint(resolve(weights))
    stored = ModelConfig.from_dict(data["config"])
    k = image_size / stored.image_size
    config = dataclasses.replace(
        stored,
        image_size=image_size,
        align=dataclasses.replace(stored.align, max_step=stored.align.max_step * k),
    )
    model = BSAFusion(config)
    state = dict(data["state_dict"])
    for name, tensor in model.state_dict().items():
        if name in state and state[name].shape != tensor.shape and name.endswith("position"):
            state[name] = torch.nn.functional.interpolate(
                state[name].float(), size=tensor.shape[-2:], mode="bilinear", align_corners=False
            ).to(tensor.dtype)
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()})
    return model


def _seed_of(*parts: int) -> int:
    return int(data_mod.item_generator(*parts).initial_seed())


class Trainer:
    """Train BSAFusion as `config` says. `resume` is a checkpoint dict from run_files.read_resume."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        dist: Distributed | None = None,
        callback: Callable[[TrainEvent], None] | None = None,
        resume: Mapping[str, Any] | None = None,
    ) -> None:
        self.config, self.resume_state = config, resume
        self.dist = dist or Distributed(device=_device(config.device))
        self.device = self.dist.device
        self.callback = callback if callback is not None and self.dist.is_main else None
        self.run_dir = Path(config.run_dir)
        self._stop = False
        autocast_for(self.device, config.precision)  # refuses bf16 on a CPU before any work

        self._load_data()
        self._build_model(resume)
        self.loss_weights = config.losses
        self.mu = config.mu_init
        self.epoch, self.start_step = 0, 0  # completed epochs; steps done in the next one
        self.partial: dict[str, float] = {}
        self.best_val_epe: float | None = None
        self.last_metrics: dict[str, Any] = {}
        if resume is not None:
            self._load_state(resume)

    # ----------------------------------------------------------------------------- set-up
    def _load_data(self) -> None:
        """Read the pairs once, split them by case, and set up the sampler and loader."""
        cfg = self.config
        moving_dir, fixed_dir = data_mod.find_pair_folder(Path(cfg.data_dir), cfg.pair)
        names = data_mod.list_pairs(moving_dir, fixed_dir)
        train_names, val_names = data_mod.split_by_case(
            names, val_cases=cfg.val_cases, val_fraction=cfg.val_fraction, seed=cfg.seed
        )
        pairs = data_mod.load_pairs(moving_dir, fixed_dir, names, image_size=cfg.image_size)
        params = data_mod.scaled_deform(cfg.deform_params, cfg.image_size)
        self.train_set = data_mod.MisalignedPairs(
            pairs.subset(train_names), params=params, seed=cfg.seed, train=True
        )
        self.val_set = data_mod.MisalignedPairs(
            pairs.subset(val_names), params=params, seed=cfg.seed, train=False
        )
        self.val_items = self.val_set.materialise(range(self.dist.rank, len(val_names), self.dist.world_size))
        self.split = {
            "moving_dir": str(moving_dir),
            "fixed_dir": str(fixed_dir),
            "train": train_names,
            "val": val_names,
        }

        world = self.dist.world_size
        self.local_batch = max(1, cfg.batch_size // world)
        self.sampler = data_mod.EpochSampler(
            len(self.train_set), rank=self.dist.rank, world_size=world, seed=cfg.seed
        )
        self.steps_per_epoch = self.sampler.steps(self.local_batch)
        self.loader = DataLoader(
            self.train_set,
            batch_size=self.local_batch,
            sampler=self.sampler,
            num_workers=cfg.workers,
            # Not persistent: each epoch's workers end with its iterator. They ignore SIGTERM (so a
            # signal to the process group stops training in order, data.ignore_sigint), so they must
            # not outlive the loop, where multiprocessing's exit would SIGTERM and wait for them.
            persistent_workers=False,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=data_mod.ignore_sigint if cfg.workers > 0 else None,
        )

    def _build_model(self, resume: Mapping[str, Any] | None) -> None:
        """The model (fresh from the seed, or the checkpoint's), its DDP wrapper and the optimizer."""
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_of(cfg.seed, 3, 0, 0))
            if resume is not None:
                self.model = load_checkpoint(dict(resume))
            elif cfg.init is not None:
                self.model = initial_model(cfg.init, cfg.image_size)
            else:
                self.model = BSAFusion(model_config(cfg.model, cfg.image_size))
        self.model.to(self.device)
        self.net: torch.nn.Module = (
            DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            if self.dist.enabled
            else self.model
        )
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: self._lr_factor(e))

    # ----------------------------------------------------------------------------- state
    def _lr_factor(self, epoch: int) -> float:
        """Cosine decay from lr (epoch 0) to lr_min (after the last epoch), as a factor of lr."""
        floor, total = self.config.lr_min / self.config.lr, self.config.epochs
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(epoch, total) / total))

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self._lr_factor(self.scheduler.last_epoch)  # --epochs may have changed
        self.epoch, self.start_step = int(state["epoch"]), int(state.get("step", 0))
        self.mu = float(state["mu"])
        metrics = state.get("metrics") or {}
        self.best_val_epe = metrics.get("best_val_epe")
        self.last_metrics = dict(metrics.get("last") or {})
        if self.dist.is_main:  # the other processes start the unfinished epoch's sums at zero
            self.partial = dict((state.get("train") or {}).get("partial") or {})

    def _checkpoint(self, name: str) -> Path:
        path = self.run_dir / name
        save_checkpoint(
            path,
            self.model,
            epoch=self.epoch,
            step=self.start_step,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            mu=self.mu,
            rng={"seed": self.config.seed, "torch": torch.get_rng_state()},
            metrics={"best_val_epe": self.best_val_epe, "last": self.last_metrics},
            train={
                "config": self.config.to_dict(),
                "partial": self.partial,
                "world_size": self.dist.world_size,
            },
        )
        return path

    def request_stop(self) -> None:
        """Stop at the next step boundary, saving last.pt (safe to call from a signal handler)."""
        self._stop = True

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop else 0.0])
        return bool(all_sum(flag, self.dist).item() > 0)  # every process stops at the same step

    def _emit(self, event: TrainEvent) -> None:
        if self.callback is not None:
            self.callback(event)

    # ----------------------------------------------------------------------------- loop
    def fit(self) -> FitResult:
        cfg = self.config
        if self.dist.is_main:
            run_files.prepare_run_dir(self.run_dir, resuming=self.resume_state is not None)
            self._write_config()
        self.log = run_files.MetricsLog(self.run_dir / run_files.METRICS, self._columns())
        if self.dist.is_main:
            self.log.truncate_after(self.epoch)
        self._emit(TrainEvent("start", self.epoch + 1, cfg.epochs, self.start_step, self.steps_per_epoch))
        stopped = False
        while self.epoch < cfg.epochs and not stopped:
            stopped = self._run_epoch()
        if not stopped:
            best = {"best_val_epe": self.best_val_epe}
            path = self.run_dir / run_files.BEST if self.best_val_epe is not None else None
            self._emit(
                TrainEvent("done", self.epoch, cfg.epochs, metrics={**self.last_metrics, **best}, path=path)
            )
        return FitResult(self.epoch, stopped, self.best_val_epe, self.last_metrics)

    @contextmanager
    def _epoch_rng(self) -> Iterator[None]:
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_seed_of(self.config.seed, 4, self.epoch, self.dist.rank))
            yield

    def _run_epoch(self) -> bool:
        """Train one epoch (from self.start_step); True if stopped before its end."""
        cfg, started = self.config, time.perf_counter()
        epoch_number = self.epoch + 1
        lr = self.optimizer.param_groups[0]["lr"]
        sums: dict[str, float] = dict(self.partial)
        self.sampler.set_epoch(self.epoch, skip=self.start_step * self.local_batch)
        self.net.train()
        step, samples = self.start_step, 0
        with self._epoch_rng():
            for batch in self.loader:
                loss, terms, n = self._train_step(batch)
                _accumulate(sums, terms, n)
                step, samples = step + 1, samples + n
                self._emit(
                    TrainEvent("step", epoch_number, cfg.epochs, step, self.steps_per_epoch, loss=loss)
                )
                if step < self.steps_per_epoch and self._should_stop():
                    self.partial, self.start_step = _global(sums, self.dist), step
                    path = self._checkpoint(run_files.LAST) if self.dist.is_main else None
                    self._emit(
                        TrainEvent("stopped", epoch_number, cfg.epochs, step, self.steps_per_epoch, path=path)
                    )
                    return True
        totals = _global(sums, self.dist)
        count = max(totals.pop("count", 0.0), 1.0)
        row: dict[str, Any] = {"epoch": epoch_number, "lr": lr, "mu": self.mu}
        row.update({f"train_{k}": v / count for k, v in sorted(totals.items())})
        self.mu = float(update_mu(totals.get("ssim_fused_fixed", 0.0), totals.get("ssim_fused_moving", 0.0)))
        self.model.refresh_modality_scorer()
        self.scheduler.step()
        self.epoch, self.start_step, self.partial = epoch_number, 0, {}
        if len(self.val_set) and (epoch_number % cfg.val_every == 0 or epoch_number == cfg.epochs):
            row.update(validate(self, mu=self.mu))
        seconds = time.perf_counter() - started
        row.update(seconds=seconds, samples_per_s=count / seconds)
        improved = row.get("val_epe") is not None and (
            self.best_val_epe is None or row["val_epe"] < self.best_val_epe
        )
        if improved:
            self.best_val_epe = row["val_epe"]
        self.last_metrics = row
        path = None
        if self.dist.is_main:
            self.log.append(row)  # before the checkpoint: a resume drops rows newer than it
            path = self._checkpoint(run_files.LAST)
            if improved:
                self._checkpoint(run_files.BEST)
        self._emit(
            TrainEvent(
                "epoch",
                epoch_number,
                cfg.epochs,
                self.steps_per_epoch,
                self.steps_per_epoch,
                metrics=row,
                path=path,
            )
        )
        if self._should_stop():
            self._emit(TrainEvent("stopped", epoch_number, cfg.epochs, path=path))
            return True
        return False

    def forward_loss(
        self, net: torch.nn.Module, batch: Mapping[str, Tensor], *, mu: float
    ) -> tuple[FusionOutput, Tensor, dict[str, Tensor]]:
        """`net` on a batch (moving, fixed, label, flow) under the run's precision, and L_total."""
        moving, fixed, label, flow_true = (
            batch[k].to(self.device, non_blocking=True) for k in ("moving", "fixed", "label", "flow")
        )
        with autocast_for(self.device, self.config.precision):
            out = net(moving, fixed)
            loss, terms = total_loss(
                out, moving=moving, fixed=fixed, label=label, mu=mu, weights=self.loss_weights, flow_true=flow_true
            )
        return out, loss, terms

    def _train_step(self, batch: Mapping[str, Tensor]) -> tuple[float, dict[str, Tensor], int]:
        _, loss, terms = self.forward_loss(self.net, batch, mu=self.mu)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return float(loss.detach()), terms, batch["moving"].shape[0]

    # ----------------------------------------------------------------------------- files
    def _columns(self) -> list[str]:
        terms = (*LOSS_TERMS, *SUMMARY_TERMS)
        return ["epoch", "lr", "mu", *(f"train_{t}" for t in terms), *VAL_COLUMNS, "seconds", "samples_per_s"]

    def _write_config(self) -> None:
        run_files.write_json(
            self.run_dir / run_files.CONFIG,
            {
                "train": self.config.to_dict(),
                "model": self.model.config.to_dict(),
                "data": self.split,
                "world_size": self.dist.world_size,
                "device": str(self.device),
                "resumed_from_epoch": self.epoch if self.resume_state is not None else None,
                "bsafuse_version": __version__,
                "torch_version": torch.__version__,
            },
        )


def _device(requested: str) -> torch.device:
    from bsafuse.device import pick_device

    return pick_device(requested)


def _accumulate(sums: dict[str, float], terms: Mapping[str, Tensor], n: int) -> None:
    """Add a batch: SSIM sums as they are, mean terms weighted by the batch size."""
    sums["count"] = sums.get("count", 0.0) + n
    names = sorted(terms)
    values = torch.stack([terms[k].float() for k in names]).tolist()  # one device sync per step
    for name, value in zip(names, values, strict=True):
        sums[name] = sums.get(name, 0.0) + value * (1 if name.startswith("ssim_") else n)


def _global(sums: Mapping[str, float], dist: Distributed) -> dict[str, float]:
    """Sums added over all processes (every process must hold the same keys)."""
    if not dist.enabled:
        return dict(sums)
    keys = sorted(sums)
    total = all_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64), dist)
    return dict(zip(keys, total.tolist(), strict=True))
