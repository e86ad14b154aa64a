"""`bsafuse train`: train BSAFusion on a data folder of aligned pairs (design.md §3, §6 and §7).

The command parses options into a TrainConfig, runs bsafuse.training.Trainer and renders its
progress on stderr. Ctrl-C (or SIGTERM, as schedulers and torchrun send) stops at the next step
boundary and saves last.pt; a second Ctrl-C aborts at once. Torch is imported inside the command.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from bsafuse.choices import Precision
from bsafuse.cli._common import err, handle_errors
from bsafuse.training.presets import ModelSize, Preset

if TYPE_CHECKING:
    from bsafuse.training import TrainConfig, Trainer, TrainEvent

SHORT = "Train BSAFusion on a folder of aligned pairs, misaligned on the fly."
HELP = (
    "Train BSAFusion on DATA_DIR (MRI/ plus one of CT/, PET/, SPECT/ holding same-named aligned "
    "images) and write config.json, metrics.csv, last.pt and best.pt into RUN_DIR.\n\n"
    "--preset paper is the paper's recipe (Adam 5e-5 cosine to 5e-7, batch 32, 3000 epochs, 256 px); "
    "--preset quick trains the small model at 64 px in minutes on a CPU; --preset residual is the "
    "recipe of the shipped v2 weights (with --init). --config-file FILE.toml overrides the preset "
    "(\\[recipe] and \\[run] tables, as in a run's config.json), and options override the file. "
    "Resume a killed or stopped run with --resume RUN_DIR/last.pt (it keeps its recipe; --epochs "
    "and the run settings may change). Several GPUs or nodes: "
    "torchrun --nproc_per_node N -m bsafuse train ... (batch size is the global batch)."
)


@handle_errors
def train(
    data_dir: Annotated[
        Path | None,
        typer.Argument(
            help="Data folder (MRI/ + CT/, PET/ or SPECT/); optional with --resume or a config file "
            "that names run.data_dir.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Run folder (default with --resume: the checkpoint's folder).",
            show_default=False,
        ),
    ] = None,
    preset: Annotated[Preset, typer.Option(help="Recipe that the config file and options override.")] = "paper",
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config-file",
            exists=True,
            dir_okay=False,
            help="TOML file of settings over the preset: \\[recipe] (e.g. epochs, lr, \\[recipe.losses], "
            "\\[recipe.deform], \\[recipe.augment], \\[recipe.fuse]) and \\[run] (e.g. device, workers).",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        ModelSize | None,
        typer.Option("--config", help="Model size (quick, residual: small; paper: paper).", show_default=False),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Epochs in all (a resumed run may raise it).", show_default=False)
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch size.", show_default=False)] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Initial learning rate; cosine decay to the preset's lr_min (paper 5e-7, quick 1e-5).",
            show_default=False,
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", "-d", help="auto, cpu, cuda or cuda:N.", show_default=False)
    ] = None,
    precision: Annotated[
        Precision | None, typer.Option(help="fp32, or bf16 autocast (CUDA only).", show_default=False)
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="DataLoader worker processes.", show_default=False)
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed of the split, the deformations and the initial weights.", show_default=False),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            help="Continue from a run's checkpoint (RUN_DIR/last.pt); 'auto': from -o RUN_DIR/last.pt "
            "if it exists, else start (for jobs that may be restarted).",
            show_default=False,
        ),
    ] = None,
    val_cases: Annotated[
        str | None,
        typer.Option(
            help="Validation cases, e.g. 16,20 (names are <case><3-digit slice>).", show_default=False
        ),
    ] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(help="Share of cases to validate on when --val-cases is not given.", show_default=False),
    ] = None,
    val_every: Annotated[
        int | None, typer.Option(help="Validate every N epochs (and after the last).", show_default=False)
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(help="Working size in pixels, a multiple of 16 (quick: 64).", show_default=False),
    ] = None,
    pair: Annotated[
        str | None, typer.Option(help="Pair folder inside DATA_DIR, e.g. ct-mri.", show_default=False)
    ] = None,
    flow_weight: Annotated[
        float | None,
        typer.Option(
            help="Weight of a supervised end-point term on the known ground-truth flow (not in the "
            "paper; paper: 0, quick: 5).",
            show_default=False,
        ),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            help="Fine-tune from these weights: a shipped name (e.g. ct-mri-v2) or a checkpoint file. "
            "The optimiser and schedule start fresh; the network's size comes from the weights.",
            show_default=False,
        ),
    ] = None,
    grad_clip: Annotated[
        float | None,
        typer.Option(help="Clip the gradient norm to this value (paper: no clipping, quick: 20).", show_default=False),
    ] = None,
) -> None:
    from bsafuse.torchrun import ProcessGroup, placement
    from bsafuse.training import Trainer

    options: dict[str, Any] = {  # a layer over the preset and the file; None: not given
        "recipe": {
            "model": config,
            "image_size": image_size,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "grad_clip": grad_clip,
            "losses": {"flow": flow_weight},
            "seed": seed,
            "init": init,
            "pair": pair,
            "val_cases": [c for c in val_cases.split(",") if c.strip()] if val_cases is not None else None,
            "val_fraction": val_fraction,
        },
        "run": {
            "data_dir": str(data_dir) if data_dir is not None else None,
            "run_dir": str(output) if output is not None else None,
            "device": device,
            "precision": precision,
            "workers": workers,
            "val_every": val_every,
        },
    }
    cfg, state = configure(preset, config_file, resume, options)
    cfg = _fit_workers(cfg)
    with ProcessGroup.for_training(placement(), cfg.run.device) as group:
        trainer = Trainer(cfg, group=group, resume=state)
        view = _ProgressView() if group.place.is_main else None
        trainer.callback = view
        with _stop_on_signals(trainer) as caught, view or contextlib.nullcontext():
            result = trainer.fit()
    if result.stopped:
        raise typer.Exit(code=128 + (caught[0] if caught else signal.SIGINT))


def configure(
    preset: Preset, config_file: Path | None, resume: str | None, options: dict[str, Any]
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The run's TrainConfig (preset < config file < options) and the checkpoint dict to resume
    from (None for a fresh run). A resumed run starts from its stored config instead of the preset."""
    from bsafuse.training import TrainConfig, read_resume
    from bsafuse.training.config import read_config_file
    from bsafuse.typed_dicts import merge

    layer = merge(read_config_file(config_file) if config_file else {}, options)
    run_dir = layer.get("run", {}).get("run_dir")
    if resume == "auto":
        last = Path(run_dir) / "last.pt" if run_dir is not None else None
        resume = str(last) if last is not None and last.is_file() else None
    if resume is not None:
        stored, state = read_resume(resume)
        where = {"run": {"run_dir": run_dir or str(Path(resume).parent)}}
        return stored.resumed_with(layer, where), state
    if not {"data_dir", "run_dir"} <= set(layer.get("run", {})):
        raise typer.BadParameter("give DATA_DIR and -o RUN_DIR (or --resume RUN_DIR/last.pt)")
    return TrainConfig.preset(preset, layer), None


def _fit_workers(cfg: TrainConfig) -> TrainConfig:
    """More loader processes than CPU cores only compete with training: cap them, with a note."""
    import dataclasses

    from bsafuse.torchrun import available_cores

    cores = available_cores()
    if cfg.run.workers <= cores:
        return cfg
    err.print(
        f"note: --workers {cfg.run.workers} is more than this machine's {cores} CPU cores; using {cores}",
        soft_wrap=True,
    )
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, workers=cores))


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer) -> Iterator[list[int]]:
    """SIGINT/SIGTERM ask the trainer to stop at a step boundary; a second SIGINT aborts."""
    caught: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and signal.SIGINT in caught:
            raise KeyboardInterrupt
        caught.append(signum)
        trainer.request_stop()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _ProgressView:
    """Renders TrainEvents: an epoch bar and a step bar (loss, it/s, ETA), one line per validation."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=err,
        )
        self.epochs = self.steps = TaskID(0)

    def __enter__(self) -> _ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, event: TrainEvent) -> None:
        p = self.progress
        if event.kind == "start":
            self.epochs = p.add_task("epochs", total=event.epochs, completed=event.epoch - 1, info="")
            self.steps = p.add_task(f"epoch {event.epoch}", total=event.steps, completed=event.step, info="")
        elif event.kind == "step":
            speed = p.tasks[self.steps].speed
            rate = f"{speed:.2f} it/s" if speed else ""
            p.update(self.steps, completed=event.step, info=f"loss {event.loss:.4f} {rate}")
        elif event.kind == "epoch":
            p.update(self.epochs, completed=event.epoch)
            if event.epoch < event.epochs:
                p.reset(self.steps, total=event.steps, description=f"epoch {event.epoch + 1}", info="")
            else:
                p.update(self.steps, visible=False)
            m = event.metrics
            if m.get("val_epe") is not None:
                p.console.print(
                    f"epoch {event.epoch}/{event.epochs}  loss {m['train_total']:.4f}  "
                    f"val EPE {m['val_epe']:.2f} px (none {m['val_epe_none']:.2f}; "
                    f"anatomy {m['val_epe_fg']:.2f}/{m['val_epe_none_fg']:.2f})  "
                    f"NCC {m['val_ncc']:.3f}  mu {m['mu']:.3f}  lr {m['lr']:.2e}",
                    soft_wrap=True,
                )
        elif event.kind == "stopped":
            where = f"after step {event.step}" if event.step else "at its end"
            p.console.print(
                f"[yellow]stopped in epoch {event.epoch} {where}; resume with --resume {event.path}[/]",
                soft_wrap=True,
            )
        elif event.kind == "done":
            best = event.metrics.get("best_val_epe")
            tail = f"; best val EPE {best:.3f} px in {event.path}" if best is not None else ""
            p.console.print(f"[green]done[/]: {event.epochs} epochs{tail}", soft_wrap=True)
