"""`bsafuse fuse MOVING FIXED -o OUT`: register and fuse files, volumes or whole folders.

The shared machinery (options, progress bar, summary) is also what `bsafuse register` uses.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bsafuse import choices
from bsafuse.cli._common import err, fail, flag, handle_errors, print_json

if TYPE_CHECKING:
    from bsafuse.results import FuseReport

SHORT = "Register MOVING onto FIXED and fuse them (files, volumes or folders)."
HELP = """Register MOVING (CT, PET or SPECT) onto FIXED (MRI) and fuse them into OUT.

Files: PNG, DICOM (a file, or a folder holding one series) or NIfTI, in any combination; the output format follows OUT's suffix and the output keeps FIXED's grid and geometry. A colour (PET/SPECT) moving image gives a colour output. Volumes are resampled into FIXED's grid and fused slice by slice.

Folders: `bsafuse fuse MOVING_DIR FIXED_DIR -o OUT_DIR` pairs files by name; finished pairs are skipped unless --overwrite; a bad pair is reported and the rest still run (exit 1 if any failed).
"""


PrecisionChoice = choices.Precision  # the CLI's choices are the library's vocabularies (Typer reads Literals)


def parse_window(value: str | None) -> tuple[float, float] | None:
    """'40,400' -> (40.0, 400.0): the CT window centre and width in Hounsfield units."""
    if value is None:
        return None
    try:
        centre, width = (float(v) for v in value.split(","))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not CENTER,WIDTH (e.g. 40,400)") from None
    # One rule for every malformed window (a usage error, exit 2), whatever is wrong with it.
    if not (math.isfinite(centre) and math.isfinite(width)) or width <= 0:
        raise typer.BadParameter(
            f"{value!r}: the centre must be a finite number and the width a positive one (e.g. 40,400)"
        )
    return centre, width


# readable=False: Typer would refuse an unreadable path as a usage error (exit 2, a boxed message);
# bsafuse reports it itself as an expected failure (one line naming the file, exit 1).
Moving = Annotated[
    Path,
    typer.Argument(readable=False, help="CT/PET/SPECT image, DICOM series folder, or a folder of them."),
]
Fixed = Annotated[
    Path, typer.Argument(readable=False, help="MRI image, DICOM series folder, or a folder of them.")
]
Weights = Annotated[
    str,
    typer.Option(
        "--weights",
        help="auto, a shipped name (ct-mri, pet-mri, spect-mri; -v1 for the old ones) or a .pt checkpoint. "
        "auto reads the DICOM Modality first (CT, PT, NM); without one (PNG, NIfTI) a grey moving image "
        "gets ct-mri and a colour one pet-mri: PET and SPECT PNGs cannot be told apart, so pass "
        "--weights spect-mri for SPECT.",
    ),
]
Device = Annotated[str, typer.Option("--device", "-d", help="auto, cpu, cuda or cuda:N.")]
Precision = Annotated[PrecisionChoice, typer.Option("--precision", help="bf16 autocast runs on CUDA only.")]
Prealign = Annotated[
    choices.Prealign | None,
    typer.Option(
        "--prealign",
        help="Classical pre-registration (SimpleITK, mutual information) before the network, which "
        "then corrects what remains. Default: the one the weights were calibrated with (pet-mri-v2: "
        "affine), else rigid. none: the network alone. affine refines the rigid result and is judged by "
        "its rigid step. A pre-alignment that "
        f"would move the pair by under {choices.NEAR_ALIGNED_PX:g} px (at {choices.REFERENCE_SIZE} px), or under "
        f"{choices.TRAINED_MOTION_PX:g} px where the network alone finds under {choices.STILL_PX:g} px of motion "
        "(or the value the weights were calibrated with; pet-mri-v2: 1 px), "
        "or that would leave the pair less similar (normalised mutual information), or more similar by "
        f"under {choices.MIN_PREALIGN_GAIN:g}, is not applied: "
        "the network registers the pair alone (prealign_skipped_slices in --json). Where the network's "
        "flow leaves the pair less similar than the pre-alignment did, the pre-alignment is kept (a "
        "warning, and fallback_slices in --json).",
        show_default=False,
    ),
]
SaveFlow = Annotated[
    Path | None,
    typer.Option(
        "--save-flow", readable=False, help="Write the flow: .npy (2,H,W) float32 pixels or .nii.gz."
    ),
]
Pattern = Annotated[str, typer.Option("--pattern", help="Folder runs: file names to pair (glob).")]
Overwrite = Annotated[bool, flag("--overwrite", help="Folder runs: redo pairs whose outputs exist.")]
Slice = Annotated[int | None, typer.Option("--slice", help="NIfTI/DICOM volumes: fuse this one slice only.")]
Axis = Annotated[str, typer.Option("--axis", help="Axis of --slice: x, y or z.")]
Window = Annotated[
    str | None,
    typer.Option(
        "--window",
        help="CT window CENTER,WIDTH in Hounsfield units for a DICOM or NIfTI CT (default brain-bone). "
        "PNGs hold display grey levels, not HU: a window is refused for them.",
    ),
]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Volume slices per network batch.")]
Json = Annotated[bool, flag("--json", help="Print a machine-readable summary on stdout.")]
IgnoreGeometry = Annotated[
    bool,
    flag(
        "--ignore-geometry",
        help="Disregard where the headers place the images (pairs without a shared frame of reference): "
        "centre the moving image on the fixed one, keeping its spacing.",
    ),
]
Anonymize = Annotated[
    bool,
    flag(
        "--anonymize",
        help="DICOM outputs: a new study with empty patient tags. Default: a derived series of the fixed "
        "image's study (same study and frame of reference, its patient tags), so viewers overlay it.",
    ),
]


@handle_errors
def fuse(
    moving: Moving,
    fixed: Fixed,
    output: Annotated[
        Path,
        typer.Option("--output", "-o", readable=False, help="Fused image (format from suffix) or folder."),
    ],
    weights: Weights = "auto",
    device: Device = "auto",
    precision: Precision = "fp32",
    prealign: Prealign = None,
    save_flow: SaveFlow = None,
    save_warped: Annotated[
        Path | None, typer.Option("--save-warped", readable=False, help="Also write the warped moving image.")
    ] = None,
    report: Annotated[
        Path | None, typer.Option("--report", readable=False, help="Write a PNG panel of the result.")
    ] = None,
    pattern: Pattern = "*",
    overwrite: Overwrite = False,
    slice_index: Slice = None,
    axis: Axis = "z",
    window: Window = None,
    batch_size: BatchSize = 8,
    anonymize: Anonymize = False,
    ignore_geometry: IgnoreGeometry = False,
    json: Json = False,
) -> None:
    """Register MOVING onto FIXED and fuse them into OUTPUT."""
    run_command("fuse", **locals())


def read_options(slice_index: int | None, axis: str, window: str | None) -> dict[str, Any]:
    """The keyword arguments for bsafuse.io.read_image."""
    if axis not in ("x", "y", "z"):
        raise typer.BadParameter(f"--axis must be x, y or z, got {axis!r}")
    options: dict[str, Any] = {"window": parse_window(window)}
    if slice_index is not None:
        options.update(slice_index=slice_index, axis=axis)
    return options


def run_command(
    mode: str,
    moving: Path,
    fixed: Path,
    output: Path,
    *,
    json: bool,
    slice_index: int | None,
    axis: str,
    window: str | None,
    **kwargs: Any,
) -> None:
    """Check the inputs exist, run fuse_files with a progress bar, render the outcome.

    The commands pass all their options (`**locals()`): those named here shape reading and
    output, the rest are fuse_files' keyword arguments of the same names.
    """
    kwargs["read_options"] = read_options(slice_index, axis, window)
    for path in (moving, fixed):
        if not path.exists():
            fail(f"{path}: no such file or folder")
    from bsafuse.batch import fuse_files  # torch is loaded here, not at `bsafuse --help`

    _log_to_stderr()
    seen: dict[str, int] = {}  # pairs done so far in a folder run, for the Ctrl-C summary
    try:
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=err, transient=True, disable=not err.is_terminal,
        ) as bar:  # fmt: skip
            task = bar.add_task(mode, total=None)

            def step(done: int, total: int, what: str) -> None:
                if what != "slices":  # folder runs count pairs; single pairs count volume slices
                    seen.update(done=done, total=total)
                bar.update(task, completed=done, total=total, description=f"{mode} {what}")

            result = fuse_files(moving, fixed, output, mode=mode, progress=step, **kwargs)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        interrupted(seen)
    render(result, json=json)


def interrupted(seen: dict[str, int]) -> NoReturn:
    """Ctrl-C: say how far the run got (finished outputs are complete files) and exit 130."""
    where = f" with {seen['done']} of {seen['total']} pairs processed" if seen else ""
    err.print(
        f"[yellow]interrupted[/]{where}; every output written so far is complete. Run the same command "
        "again to finish: finished pairs are skipped",
        soft_wrap=True,
    )
    raise typer.Exit(code=130)


class _WarningLines(logging.Handler):
    """Library warnings as one line each on stderr ("warning: ..."), never wrapped."""

    def emit(self, record: logging.LogRecord) -> None:
        err.print(f"[yellow]warning:[/] {escape(record.getMessage())}", soft_wrap=True, highlight=False)


def _log_to_stderr() -> None:
    """Library warnings (e.g. the network's flow dropped for a pair) as Rich lines on stderr."""
    logger = logging.getLogger("bsafuse")
    if not any(isinstance(h, _WarningLines) for h in logger.handlers):  # bsafuse/__init__ adds a NullHandler
        logger.addHandler(_WarningLines(level=logging.WARNING))
        logger.setLevel(logging.WARNING)


def _skipped(count: int) -> str:
    """The summary's skipped part: only where pairs were skipped does --overwrite need a word."""
    return f"{count} skipped (outputs exist; --overwrite redoes them), " if count else "0 skipped, "


def render(report: FuseReport, *, json: bool) -> None:
    """Summary on stderr (JSON on stdout with --json); exit 1 if any pair failed."""
    if not report.is_main:  # torchrun: rank 0 reports every rank's pairs (bsafuse.torchrun)
        return
    if json:
        print_json(report.to_dict())
    weights = ", ".join(report.weights) or "none loaded"
    if not report.folder:
        item = report.items[0]
        if item.status == "failed":
            fail(item.error or "failed")
        err.print(
            f"wrote {escape(str(item.output))} in {item.seconds:.1f} s "
            f"(weights: {escape(weights)}; device: {report.device})",
            soft_wrap=True,
        )
        return
    err.print(
        f"{len(report.ok)} done, {_skipped(len(report.skipped))}{len(report.failed)} failed "
        f"(weights: {escape(weights)}; device: {report.device})",
        soft_wrap=True,
    )
    if report.failed:
        table = Table(title="failed pairs", title_justify="left")
        table.add_column("moving", no_wrap=True)
        table.add_column("reason", overflow="fold")
        for item in report.failed:
            table.add_row(escape(item.moving.name) if item.moving else "", escape(item.error or ""))
        err.print(table)
        fail(f"{len(report.failed)} of {len(report.items)} pairs failed")
