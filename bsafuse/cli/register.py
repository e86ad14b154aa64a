"""`bsafuse register MOVING FIXED -o WARPED`: the registration half of `fuse` alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bsafuse.cli._common import handle_errors
from bsafuse.cli.fuse import (
    Anonymize,
    Axis,
    BatchSize,
    Device,
    Fixed,
    IgnoreGeometry,
    Json,
    Moving,
    Overwrite,
    Pattern,
    Prealign,
    Precision,
    SaveFlow,
    Slice,
    Weights,
    Window,
    run_command,
)

SHORT = "Warp MOVING onto FIXED (registration only) and write the warped image."
HELP = """Warp MOVING (CT, PET or SPECT) onto FIXED (MRI) with the network's flow and write WARPED.

Same inputs as `bsafuse fuse` (files, DICOM series folders, NIfTI volumes, or two folders of pairs); WARPED keeps FIXED's grid and geometry. --save-flow writes the displacement field.
"""


@handle_errors
def register(
    moving: Moving,
    fixed: Fixed,
    output: Annotated[
        Path,
        typer.Option("--output", "-o", readable=False, help="Warped image (format from suffix) or folder."),
    ],
    weights: Weights = "auto",
    device: Device = "auto",
    precision: Precision = "fp32",
    prealign: Prealign = None,
    save_flow: SaveFlow = None,
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
    """Warp MOVING onto FIXED and write OUTPUT."""
    run_command("register", **locals())
