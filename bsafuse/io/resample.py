"""Resample a moving image into a fixed image's physical grid (SimpleITK, world coordinates).

Both images are placed in LPS space by their geometry (`MedicalImage.spacing/origin/direction`;
a 2-D image is a one-slice grid) and the moving image is sampled, linearly, at the centre of every
fixed pixel. Where the fixed grid lies outside the moving image the result is 0. A moving image
that does not overlap the fixed grid at all is an error: it almost always means the two files do
not share a coordinate system (different scanners' frames of reference, or a PNG paired with a
DICOM), and a black output would hide it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from bsafuse.errors import InputError
from bsafuse.io.image import MedicalImage


def _sitk() -> Any:
    try:
        import SimpleITK
    except ImportError as exc:
        raise InputError("resampling needs SimpleITK: pip install SimpleITK") from exc
    return SimpleITK


def to_sitk(image: MedicalImage, array: NDArray[Any] | None = None) -> Any:
    """A 3-D SimpleITK image of `image`'s pixels (or `array` of the same shape) and geometry."""
    sitk = _sitk()
    data = image.pixels if array is None else array
    if not image.is_volume:
        data = data[None]  # a 2-D image is one slice: (1, H, W) or (1, H, W, 3)
    vector = image.is_colour and array is None  # a replacement array is grey
    out = sitk.GetImageFromArray(np.ascontiguousarray(data), isVector=vector)
    out.SetSpacing(image.spacing)
    out.SetOrigin(image.origin)
    out.SetDirection(image.direction)
    return out


class NoOverlapError(InputError):
    """The moving image lies entirely outside the fixed image's physical grid."""


def resample_to(moving: MedicalImage, fixed: MedicalImage) -> MedicalImage:
    """`moving` sampled on `fixed`'s grid: fixed's shape and geometry, moving's other metadata.

    Shapes: the result has fixed's spatial shape, (H, W) or (D, H, W), plus moving's colour
    channels. Raises InputError, naming both files, when the two grids do not overlap.
    """
    sitk = _sitk()
    if moving.is_colour and fixed.is_volume:
        raise InputError(
            f"{moving.name} is a colour slice and {fixed.name} a volume; colour volumes are not supported"
        )
    reference = to_sitk(fixed, np.zeros(fixed.shape, dtype=np.float32))
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(reference)
    resampler.SetTransform(sitk.Transform())
    resampler.SetDefaultPixelValue(0.0)
    resampler.SetInterpolator(sitk.sitkNearestNeighbor)
    support = sitk.GetArrayFromImage(resampler.Execute(to_sitk(moving, np.ones(moving.shape, np.float32))))
    if not support.any():
        raise NoOverlapError(
            f"{moving.name} and {fixed.name} do not overlap in physical space (different frames of "
            "reference?); check that both show the same patient position, or pass --ignore-geometry to "
            "centre the moving image on the fixed one (the network and --prealign then align them)"
        )
    resampler.SetInterpolator(sitk.sitkLinear)
    values = sitk.GetArrayFromImage(resampler.Execute(to_sitk(moving)))
    if not fixed.is_volume:
        values = values[0]
    return moving.with_pixels(
        np.clip(values, 0.0, 1.0),
        is_colour=moving.is_colour,
        spacing=fixed.spacing,
        origin=fixed.origin,
        direction=fixed.direction,
        nifti=fixed.nifti,
    )
