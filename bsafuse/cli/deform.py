"""`bsafuse deform IMAGE -o OUT`: a randomly misaligned copy of an image, with the flow that undoes it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bsafuse.cli._common import err, handle_errors
from bsafuse.cli.fuse import Axis, SaveFlow, Window, read_options
from bsafuse.errors import InputError, OutputError

if TYPE_CHECKING:
    import numpy as np

    from bsafuse.io import MedicalImage

SHORT = "Deform IMAGE at random (rigid + elastic) and write it, with the flow that undoes it."
HELP = """Deform IMAGE with a random rotation, translation, scale and smooth elastic warp, and write OUT.

Each amplitude is an upper bound: the rotation angle is drawn in [-ROTATE, ROTATE], and so on. The same --seed gives the same deformation. OUT keeps IMAGE's grid and geometry (format from OUT's suffix).

--save-flow writes the ground-truth registration flow, a .npy (2, H, W) float32 in pixels (channel 0 = x) or a .nii.gz: warping OUT with it gives IMAGE back, so it is what a registration of OUT (moving) onto IMAGE (fixed) should find.
"""


def _check_outputs(image: Path, *outputs: Path | None) -> None:
    """Never overwrite the input, never write two outputs to one file; the flow's suffix is known."""
    written: list[Path] = []
    for path in (p for p in outputs if p is not None):
        same_file = path.exists() and image.exists() and os.path.samefile(path, image)
        if same_file or path.resolve() == image.resolve():
            raise OutputError(
                f"{path} is the input image; refusing to overwrite it. Choose another output name"
            )
        if path.resolve() in written:
            raise OutputError(f"{path} is given twice (output and --save-flow); choose two names")
        written.append(path.resolve())
    flow = outputs[-1]
    if flow is not None and not flow.name.lower().endswith((".npy", ".nii", ".nii.gz")):
        raise InputError(f"--save-flow {flow}: use a .npy or .nii.gz file name")


def _as_batch(image: MedicalImage) -> tuple[np.ndarray, bool]:
    """(1, C, H, W) float32 pixels of a 2-D image, and whether it is colour; volumes are refused."""
    import numpy as np

    if image.is_volume:
        raise InputError(
            f"{image.name} is a volume {image.shape}; bsafuse deform works on 2-D images: pick one with --slice N"
        )
    pixels = np.asarray(image.pixels, dtype=np.float32)
    colour = image.is_colour
    return (pixels.transpose(2, 0, 1) if colour else pixels[None])[None], colour


# The deformation amplitudes (DeformParams), shared with `bsafuse evaluate`; defaults as DeformParams().
Rotate = Annotated[float, typer.Option("--rotate", min=0, max=45, help="Largest rotation, degrees.")]
Translate = Annotated[float, typer.Option("--translate", min=0, help="Largest shift per axis, pixels.")]
Elastic = Annotated[float, typer.Option("--elastic", min=0, max=8, help="Largest elastic displacement, pixels.")]
Scale = Annotated[float, typer.Option("--scale", min=0, max=0.5, help="Largest scale change (0.05 = 5%).")]


@handle_errors
def deform(
    image: Annotated[Path, typer.Argument(help="Image to deform: PNG, DICOM or NIfTI (a 2-D slice).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Deformed image; format from suffix.")],
    seed: Annotated[int, typer.Option("--seed", help="Random seed: same seed, same deformation.")] = 0,
    rotate: Rotate = 10.0,
    translate: Translate = 10.0,
    elastic: Elastic = 4.0,
    scale: Scale = 0.05,
    save_flow: SaveFlow = None,
    slice_index: Annotated[
        int | None, typer.Option("--slice", help="NIfTI/DICOM volumes: deform this one slice.")
    ] = None,
    axis: Axis = "z",
    window: Window = None,
) -> None:
    """Deform IMAGE at random and write OUTPUT (and the ground-truth flow)."""
    import numpy as np
    import torch

    from bsafuse.deform import DeformParams, random_deformation
    from bsafuse.flow_files import save_flow as write_flow
    from bsafuse.io import read_image, write_image

    _check_outputs(image, output, save_flow)
    params = DeformParams(rotate_deg=rotate, translate_px=translate, scale=scale, elastic_px=elastic)
    source = read_image(image, **read_options(slice_index, axis, window))
    pixels, colour = _as_batch(source)
    generator = torch.Generator().manual_seed(seed)
    deformed, flow = random_deformation(torch.from_numpy(pixels), params=params, generator=generator)
    result = deformed[0].clamp(0, 1).numpy()
    write_image(output, result.transpose(1, 2, 0) if colour else result[0], like=source)
    flow_np = flow[0].numpy()
    if save_flow is not None:
        write_flow(save_flow, flow_np, like=source)
    size = np.linalg.norm(flow_np, axis=0)
    err.print(
        f"wrote [bold]{output}[/] ({flow_np.shape[2]}x{flow_np.shape[1]}, seed {seed}); ground-truth flow: "
        f"max {size.max():.1f} px, mean {size.mean():.1f} px" + (f" -> {save_flow}" if save_flow else ""),
        soft_wrap=True,
    )
