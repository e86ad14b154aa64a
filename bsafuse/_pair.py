"""Check a moving/fixed pair and bring the moving pixels into the fixed image's pixel grid.

Volumes (and 2-D images of different sizes that both carry real geometry, DICOM or NIfTI) are
resampled in world coordinates with SimpleITK; plain arrays and PNGs carry no geometry, so a moving
image of another size is assumed to cover the same field of view and is resized, keeping its pixel
aspect: one of another aspect ratio is scaled to fit inside the fixed grid and centred, never
stretched (with a warning). numpy in, numpy out.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bsafuse.errors import InputError
from bsafuse.io import MedicalImage
from bsafuse.io.resample import NoOverlapError

ImageLike = MedicalImage | np.ndarray | Tensor
MIN_SIDE = 2  # pixels: the smallest image side accepted
ASPECT_TOLERANCE = 0.01  # relative difference of aspect ratios below which a resize is a plain resize
log = logging.getLogger(__name__)


def pair_in_fixed_grid(
    moving: ImageLike, fixed: ImageLike, *, ignore_geometry: bool = False, centre_if_apart: bool = False
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Check a pair and bring the moving pixels into the fixed image's grid.

    Returns moving pixels ((H, W), (H, W, 3) or (D, H, W)), fixed pixels ((H, W) or (D, H, W))
    and whether the pair is a volume pair. `ignore_geometry` disregards where the headers place
    the images (different frames of reference): the moving image keeps its spacing and direction
    and is centred on the fixed image before the world-coordinate resampling. `centre_if_apart`
    (set where a pre-alignment follows) does the same, by centres of mass and with a warning,
    only where the two images do not overlap in physical space at all.
    """
    if ignore_geometry and isinstance(moving, MedicalImage) and isinstance(fixed, MedicalImage):
        moving = moving.centred_on(fixed)
    fixed_px = _pixels(fixed, "fixed")
    if _is_colour(fixed, fixed_px):
        if np.ptp(fixed_px, axis=-1).max() > 1e-6:
            raise InputError(
                f"{_name(fixed, 'the fixed image')} is a colour (RGB) image; the fixed image must be the grey "
                "MRI. Did you swap MOVING and FIXED? The colour PET/SPECT image goes first"
            )
        fixed_px = fixed_px[..., 0]  # an RGB file holding a grey image
    moving_px = _pixels(moving, "moving")
    _check_content(moving, moving_px, fixed, fixed_px)
    fixed_volume = fixed_px.ndim == 3
    moving_volume = moving_px.ndim == 3 and not _is_colour(moving, moving_px)
    if fixed_volume != moving_volume:
        which = ("moving", "fixed") if moving_volume else ("fixed", "moving")
        raise InputError(
            f"{_name(moving, 'the moving image')} and {_name(fixed, 'the fixed image')} do not match: the {which[0]} "
            f"image is a volume but the {which[1]} image is 2-D; give two volumes, or pick one slice of the "
            "volume with --slice N"
        )
    if fixed_volume and _is_colour(moving, moving_px):
        raise InputError(f"{_name(moving, 'the moving image')}: colour volumes are not supported")
    spatial = moving_px.shape[:2] if moving_px.ndim == 3 and not moving_volume else moving_px.shape
    if fixed_volume or (spatial != fixed_px.shape and _has_geometry(moving) and _has_geometry(fixed)):
        try:
            moving_px = _resample_world(moving, fixed)
        except NoOverlapError:
            if not (centre_if_apart and isinstance(moving, MedicalImage) and isinstance(fixed, MedicalImage)):
                raise
            log.warning(
                "%s and %s do not overlap in physical space; the moving image is centred on the fixed one "
                "by their centres of mass, and the pre-alignment starts from there", moving.name, fixed.name,
            )  # fmt: skip
            moving_px = _resample_world(moving.centred_on(fixed, by_mass=True), fixed)
    elif spatial != fixed_px.shape:
        moving_px = _resize(moving_px, fixed_px.shape, _name(moving, "the moving image"))
    return moving_px, fixed_px, fixed_volume


def _check_content(moving: ImageLike, moving_px: np.ndarray, fixed: ImageLike, fixed_px: np.ndarray) -> None:
    """Refuse images too small to hold anatomy, and a blank fixed image.

    An all-zero *moving* image is accepted: a slice without CT/PET/SPECT signal is legitimate (the
    end of a volume, a cold PET slice) and is fused like any other. An all-zero *fixed* image leaves
    nothing to register to and nothing to fuse into, and almost always means a wrong file or slice.
    """
    for image, pixels, role in ((moving, moving_px, "moving"), (fixed, fixed_px, "fixed")):
        plane = pixels.shape[:2] if _is_colour(image, pixels) else pixels.shape[-2:]
        if min(plane) < MIN_SIDE:
            size = " x ".join(map(str, plane))
            raise InputError(
                f"{_name(image, f'the {role} image')} is {size} pixels; images need at least "
                f"{MIN_SIDE} x {MIN_SIDE} pixels"
            )
    if not fixed_px.any():
        raise InputError(
            f"{_name(fixed, 'the fixed image')} is blank (every pixel is 0 after normalisation): there is "
            "nothing to register to. Check the file (and --slice, for a volume)"
        )


def _pixels(image: ImageLike, role: str) -> np.ndarray:
    """Float32 pixels in [0, 1] from a MedicalImage, array or tensor; InputError otherwise."""
    if isinstance(image, MedicalImage):
        return np.asarray(image.pixels, dtype=np.float32)
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array / 255.0
    elif array.dtype == np.uint16:
        array = array / 65535.0
    elif not np.issubdtype(array.dtype, np.floating):
        raise InputError(
            f"the {role} array has dtype {array.dtype}; expected float in [0, 1], uint8 or uint16"
        )
    array = array.astype(np.float32)
    if array.ndim not in (2, 3):
        raise InputError(f"the {role} array has shape {array.shape}; expected (H, W), (H, W, 3) or (D, H, W)")
    if not np.isfinite(array).all():
        raise InputError(f"the {role} array holds NaN or infinite values; clean it first")
    if array.size and (array.min() < -1e-3 or array.max() > 1 + 1e-3):
        raise InputError(
            f"the {role} array has values in [{array.min():.3g}, {array.max():.3g}]; expected [0, 1]. "
            "Normalise it first (bsafuse.io.read_image does this for files)"
        )
    return np.clip(array, 0, 1)


def _is_colour(image: ImageLike, pixels: np.ndarray) -> bool:
    if isinstance(image, MedicalImage):
        return bool(image.is_colour)
    return pixels.ndim == 3 and pixels.shape[-1] == 3


def _has_geometry(image: ImageLike) -> bool:
    """True for images whose header places them in the world (DICOM, NIfTI), not PNGs or arrays."""
    return isinstance(image, MedicalImage) and image.source_format in ("dicom", "nifti")


def _resample_world(moving: ImageLike, fixed: ImageLike) -> np.ndarray:
    """The moving pixels in the fixed image's physical grid (SimpleITK, world coordinates)."""
    if not (isinstance(moving, MedicalImage) and isinstance(fixed, MedicalImage)):
        mov, fix = _pixels(moving, "moving"), _pixels(fixed, "fixed")
        if mov.shape != fix.shape:
            raise InputError(
                f"the moving volume is {mov.shape} and the fixed volume {fix.shape}; arrays carry no geometry, "
                "so volumes given as arrays must have the same shape (read files with bsafuse.io.read_image)"
            )
        return mov
    from bsafuse.io.resample import resample_to

    return np.asarray(resample_to(moving, fixed).pixels, dtype=np.float32)


def _resize(pixels: np.ndarray, shape: tuple[int, ...], name: str = "the moving image") -> np.ndarray:
    """A 2-D grey or RGB array brought to `shape` = (H, W) without geometry: its pixel aspect kept.

    Same aspect ratio (within 1 %): a bilinear resize (the same field of view is assumed). Another
    aspect ratio: scaled uniformly to fit inside (H, W) and centred, the rest padded with zeros (no
    moving data there), never stretched; a warning says so.
    """
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    x = x.permute(2, 0, 1)[None] if x.ndim == 3 else x[None, None]
    (h, w), (height, width) = x.shape[-2:], (int(shape[0]), int(shape[1]))
    size = (height, width)
    if abs((h / w) / (height / width) - 1) > ASPECT_TOLERANCE:
        scale = min(height / h, width / w)
        size = (min(height, max(1, round(h * scale))), min(width, max(1, round(w * scale))))
        log.warning(
            "%s is %d x %d pixels and the fixed image %d x %d; without geometry (PNG or array) it is "
            "scaled by %.3g keeping its aspect and centred, not stretched", name, h, w, height, width, scale,
        )  # fmt: skip
    smaller = size[0] < h or size[1] < w
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=True, antialias=smaller)[0]
    top, left = (height - size[0]) // 2, (width - size[1]) // 2
    x = F.pad(x, (left, width - size[1] - left, top, height - size[0] - top))
    return (x.permute(1, 2, 0) if pixels.ndim == 3 else x[0]).numpy()


def _name(image: Any, default: str) -> str:
    return image.name if isinstance(image, MedicalImage) and image.path is not None else default
