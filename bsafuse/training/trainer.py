"""Trainer: BSAFusion's training loop (design.md §3), one process or many under torchrun.

Per epoch: train on freshly misaligned pairs (run_data), update mu from the epoch's SSIM sums
(losses.update_mu), re-copy the modality scorer (model.refresh_modality_scorer), step the cosine
schedule (state.Optimisation), validate every `run.val_every` epochs (validation.validate), and
write metrics.csv, last.pt and, when the validation end-point error improves, best.pt. The
trainer never prints: it reports through a callback (the command line renders a progress bar).

Reproducibility: data randomness comes from per-item generators seeded by (seed, epoch, index),
and model initialisation (network.run_model) and each epoch's own randomness (dropout, if any)
from generators forked off (seed, epoch, rank), never from the caller's global state. So a run
resumed from last.pt at an epoch boundary continues exactly as if it had not stopped; a run stopped
mid-epoch with `request_stop()` (Ctrl-C) saves its step and sums and resumes at the next batch.

Under torchrun every process runs this loop with its share of each global batch (batch_size is the
global batch); DistributedDataParallel averages the gradients, the epoch sums are added over
processes (torchrun.ProcessGroup.all_sum), and validation is split across processes and summed.
Rank 0 alone writes files and calls the callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from bsafuse import data as data_mod
from bsafuse._version import __version__
from bsafuse.device import autocast_for
from bsafuse.losses import LOSS_TERMS, SUMMARY_TERMS, update_mu
from bsafuse.torchrun import Placement, ProcessGroup
from bsafuse.training.config import TrainConfig
from bsafuse.training.network import EPOCH_STREAM, run_model, seed_of
from bsafuse.training.objective import Objective, accumulate, summed
from bsafuse.training.run_data import load_run_data
from bsafuse.training.run_files import BEST, CONFIG, LAST, METRICS, MetricsLog, prepare_run_dir, write_json
from bsafuse.training.state import Optimisation, TrainState, save_state
from bsafuse.training.validation import VAL_COLUMNS, validate

EventKind = Literal["start", "step", "epoch", "stopped", "done"]
COLUMNS = (  # of metrics.csv
    "epoch",
    "lr",
    "mu",
    *(f"train_{t}" for t in (*LOSS_TERMS, *SUMMARY_TERMS)),
    *VAL_COLUMNS,
    "seconds",
    "samples_per_s",
)


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


class Trainer:
    """Train BSAFusion as `config` says. `resume` is a checkpoint dict from run_files.read_resume.

    `group` is this process's torchrun.ProcessGroup (default: a single process on run.device).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        group: ProcessGroup | None = None,
        callback: Callable[[TrainEvent], None] | None = None,
        resume: Mapping[str, Any] | None = None,
    ) -> None:
        self.config, self.resume_state = config, resume
        self.group = group or ProcessGroup.for_training(Placement(), config.run.device)
        self.place, self.device = self.group.place, self.group.device
        self.callback = callback if callback is not None and self.place.is_main else None
        self.run_dir = Path(config.run.run_dir)
        self._stop = False
        autocast_for(self.device, config.run.precision)  # refuses bf16 on a CPU before any work

        self.data = load_run_data(config, self.place, pin_memory=self.device.type == "cuda")
        self.model = run_model(config.recipe, resume).to(self.device)
        self.net: torch.nn.Module = self.model
        if self.place.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids, process_group=self.group.group)
        self.optimisation = Optimisation(self.model, config.recipe)
        self.optimizer, self.scheduler = self.optimisation.optimizer, self.optimisation.scheduler
        self.objective = Objective(config.recipe.losses, self.device, config.run.precision)
        self.state = TrainState()
        if resume is not None:
            self.optimisation.restore(resume)
            self.state = TrainState.from_checkpoint(resume, is_main=self.place.is_main)
        if config.recipe.losses.mu is not None:  # a fixed mu from the first epoch on
            self.state.mu = config.recipe.losses.mu

    def request_stop(self) -> None:
        """Stop at the next step boundary, saving last.pt (safe to call from a signal handler)."""
        self._stop = True

    def fit(self) -> FitResult:
        epochs, state = self.config.recipe.epochs, self.state
        if self.place.is_main:
            prepare_run_dir(self.run_dir, resuming=self.resume_state is not None)
            self._write_config()
        self.log = MetricsLog(self.run_dir / METRICS, COLUMNS)
        if self.place.is_main:
            self.log.truncate_after(state.epoch)
        self._emit(TrainEvent("start", state.epoch + 1, epochs, state.step, self.data.steps_per_epoch))
        stopped = False
        while state.epoch < epochs and not stopped:
            stopped = self._run_epoch()
        if not stopped:
            best = {"best_val_epe": state.best_val_epe}
            path = self.run_dir / BEST if state.best_val_epe is not None else None
            metrics = {**state.last_metrics, **best}
            self._emit(TrainEvent("done", state.epoch, epochs, metrics=metrics, path=path))
        return FitResult(state.epoch, stopped, state.best_val_epe, state.last_metrics)

    # ----------------------------------------------------------------------------- one epoch
    def _run_epoch(self) -> bool:
        """Train one epoch (from state.step); True if stopped before its end."""
        state, epochs, steps = self.state, self.config.recipe.epochs, self.data.steps_per_epoch
        number, lr, started = state.epoch + 1, self.optimisation.lr, time.perf_counter()
        sums: dict[str, float] = dict(state.partial)
        self.data.sampler.set_epoch(state.epoch, skip=state.step * self.data.local_batch)
        self.net.train()
        step = state.step
        with self._epoch_rng():
            with data_mod.stop_signals_blocked():  # the loader forks its workers here
                batches = iter(self.data.loader)
            for batch in batches:
                loss, terms, n = self._train_step(batch)
                accumulate(sums, terms, n)
                step += 1
                self._emit(TrainEvent("step", number, epochs, step, steps, loss=loss))
                if step < steps and self._should_stop():
                    state.partial, state.step = summed(sums, self.group.all_sum), step
                    path = self._checkpoint(LAST)
                    self._emit(TrainEvent("stopped", number, epochs, step, steps, path=path))
                    return True
        totals = summed(sums, self.group.all_sum)
        samples = max(totals.get("count", 0.0), 1.0)
        row = self._end_epoch(totals, lr=lr)
        seconds = time.perf_counter() - started
        row.update(seconds=seconds, samples_per_s=samples / seconds)
        improved = row.get("val_epe") is not None and (
            state.best_val_epe is None or row["val_epe"] < state.best_val_epe
        )
        if improved:
            state.best_val_epe = row["val_epe"]
        state.last_metrics = row
        if self.place.is_main:
            self.log.append(row)  # before the checkpoint: a resume drops rows newer than it
        path = self._checkpoint(LAST)
        if improved:
            self._checkpoint(BEST)
        self._emit(TrainEvent("epoch", number, epochs, steps, steps, metrics=row, path=path))
        if self._should_stop():
            self._emit(TrainEvent("stopped", number, epochs, path=path))
            return True
        return False

    def _end_epoch(self, totals: dict[str, float], *, lr: float) -> dict[str, Any]:
        """Close an epoch: its row of means, mu and the schedule for the next, and validation."""
        state, run = self.state, self.config.run
        count = max(totals.pop("count", 0.0), 1.0)
        row: dict[str, Any] = {"epoch": state.epoch + 1, "lr": lr, "mu": state.mu}
        row.update({f"train_{k}": v / count for k, v in sorted(totals.items())})
        ssim_fixed, ssim_moving = totals.get("ssim_fused_fixed", 0.0), totals.get("ssim_fused_moving", 0.0)
        if self.config.recipe.losses.mu is None:  # else state.mu holds the fixed one (__init__)
            state.mu = float(update_mu(ssim_fixed, ssim_moving))
        self.model.refresh_modality_scorer()
        self.scheduler.step()
        state.epoch, state.step, state.partial = state.epoch + 1, 0, {}
        last = state.epoch == self.config.recipe.epochs
        if len(self.data.val_set) and (state.epoch % run.val_every == 0 or last):
            row.update(
                validate(
                    self.model,
                    self.data.val_items,
                    objective=self.objective,
                    mu=state.mu,
                    batch_size=self.data.local_batch,
                    reduce=self.group.all_sum,
                )
            )
        return row

    def _train_step(self, batch: Mapping[str, Tensor]) -> tuple[float, dict[str, Tensor], int]:
        _, loss, terms = self.objective(self.net, batch, mu=self.state.mu)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.recipe.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.recipe.grad_clip)
        self.optimizer.step()
        return float(loss.detach()), terms, batch["moving"].shape[0]

    @contextmanager
    def _epoch_rng(self) -> Iterator[None]:
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed_of(self.config.recipe.seed, EPOCH_STREAM, self.state.epoch, self.place.rank))
            yield

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop else 0.0])
        return bool(self.group.all_sum(flag).item() > 0)  # every process stops at the same step

    def _emit(self, event: TrainEvent) -> None:
        if self.callback is not None:
            self.callback(event)

    # ----------------------------------------------------------------------------- files
    def _checkpoint(self, name: str) -> Path | None:
        """Write RUN_DIR/name on rank 0 (None on the other processes)."""
        if not self.place.is_main:
            return None
        return save_state(
            self.run_dir / name,
            self.model,
            state=self.state,
            optimisation=self.optimisation,
            config=self.config,
            world_size=self.place.world_size,
        )

    def _write_config(self) -> None:
        write_json(
            self.run_dir / CONFIG,
            {
                "train": self.config.to_dict(),
                "model": self.model.config.to_dict(),
                "data": self.data.split,
                "world_size": self.place.world_size,
                "device": str(self.device),
                "resumed_from_epoch": self.state.epoch if self.resume_state is not None else None,
                "bsafuse_version": __version__,
                "torch_version": torch.__version__,
            },
        )
