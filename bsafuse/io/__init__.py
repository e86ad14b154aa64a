"""Medical image I/O: PNG, DICOM (file, multi-frame, one-series folder) and NIfTI, as `MedicalImage`.

    from bsafuse.io import read_image, write_image
    ct = read_image("ct.dcm")                       # CT in HU through the brain-bone window
    mri = read_image("t1.nii.gz", slice_index=80)   # one axial slice (axis convention: io/nifti.py)
    write_image("fused.dcm", fused_pixels, like=mri)

The format is taken from the file's content where it says (PNG signature, 'DICM' at byte 128,
NIfTI magic, gzip), else from the suffix; a folder is a DICOM series. Every failure to read is an
`InputError` naming the file. numpy only: tensors are made in `bsafuse.api`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from bsafuse.errors import InputError, OutputError
from bsafuse.io.atomic import atomic_path, full_suffix
from bsafuse.io.image import MedicalImage

__all__ = ["SUPPORTED", "MedicalImage", "read_image", "write_image"]

logger = logging.getLogger(__name__)
SUPPORTED = (".png", ".dcm", ".nii", ".nii.gz")
SUPPORTED_TEXT = ".png, .dcm (also DICOM files without a suffix, and folders of one series), .nii, .nii.gz"
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", "")


def sniff(path: Path) -> str | None:
    """'png', 'dicom', 'nifti' or 'gzip' from the first bytes of `path`; None if none matches."""
    from bsafuse.io.dicom import MAGIC
    from bsafuse.io.png import SIGNATURE

    with path.open("rb") as f:
        head = f.read(348)
    if head.startswith(SIGNATURE):
        return "png"
    if head[128:132] == MAGIC:
        return "dicom"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head[344:348] in (b"n+1\0", b"ni1\0") or head[4:8] == b"n+2\0":
        return "nifti"
    return None


def _format(path: Path) -> str:
    """Which reader: content first, then suffix; InputError for anything unsupported."""
    suffix = full_suffix(path)
    try:
        if path.stat().st_size == 0:
            raise InputError(f"{path} is empty (0 bytes); check the export or download finished")
        kind = sniff(path)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if kind == "gzip":
        kind = "nifti" if suffix in (".nii.gz", ".gz") else None
    by_suffix = {".png": "png", ".nii": "nifti", ".nii.gz": "nifti"}.get(suffix)
    if by_suffix is None and suffix in DICOM_SUFFIXES:
        by_suffix = "dicom"
    if kind is not None:
        # Content wins, and a misleading name is worth a warning (DICOM names are free-form: no warning).
        if by_suffix != kind and not (by_suffix is None and (kind == "dicom" or suffix == ".gz")):
            logger.warning(
                "%s holds %s data despite its suffix; reading it as %s", path, kind.upper(), kind.upper()
            )
        return kind
    if by_suffix == "png":
        raise InputError(
            f"{path} is not a PNG file (no PNG signature); it may be truncated or another format"
        )
    if by_suffix is None:
        raise InputError(
            f"{path}: unsupported or unrecognised format {suffix!r}; bsafuse reads {SUPPORTED_TEXT}"
        )
    return by_suffix


def _check_window(window: tuple[float, float] | None) -> tuple[float, float] | None:
    if window is None:
        return None
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise InputError(f"window must be (centre, width), got {window!r}") from None
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise InputError(f"window must be (centre, width) with a positive width, got {window!r}")
    return center, width


def read_image(
    path: str | os.PathLike[str],
    *,
    slice_index: int | None = None,
    axis: str = "z",
    window: tuple[float, float] | None = None,
    volume: int | None = None,
) -> MedicalImage:
    """Read a PNG, DICOM file or folder, or NIfTI file as a `MedicalImage` in [0, 1].

    Args:
        slice_index: take one 2-D slice of a volume (counted in the file's own voxel order).
        axis: the direction the slice is taken across: "z" axial, "y" coronal, "x" sagittal.
        window: (centre, width) in source units (HU for CT); default: intensity.py's rules.
        volume: for a 4-D NIfTI file, which 3-D volume to read.

    Raises:
        InputError: naming the file, for anything that cannot be read as asked.
    """
    path = Path(path)
    window = _check_window(window)
    if axis not in ("x", "y", "z"):
        raise InputError(f"axis must be 'x', 'y' or 'z', got {axis!r}")
    if not path.exists():
        raise InputError(f"{path} does not exist")
    reader: Callable[..., MedicalImage]
    if path.is_dir():
        from bsafuse.io.dicom import read_dicom_series

        kind, reader = "dicom", read_dicom_series
    else:
        kind = _format(path)
    if volume is not None and kind != "nifti":
        raise InputError(
            f"volume={volume} selects a volume of a 4-D NIfTI file, but {path} is {kind.upper()}"
        )
    if kind == "png":
        from bsafuse.io.png import read_png

        if slice_index is not None:
            raise InputError(f"slice_index was given but {path} is a 2-D PNG; leave it out")
        return read_png(path, window=window)
    if kind == "nifti":
        from bsafuse.io.nifti import read_nifti

        return read_nifti(path, slice_index=slice_index, axis=axis, window=window, volume=volume)
    if not path.is_dir():
        from bsafuse.io.dicom import read_dicom_file

        _check_bare_dicom(path)
        reader = read_dicom_file
    return reader(path, slice_index=slice_index, axis=axis, window=window)


def _check_bare_dicom(path: Path) -> None:
    """A file without the 'DICM' marker must at least parse as a DICOM image header."""
    from bsafuse.io.dicom import has_magic, load_dataset

    if has_magic(path):
        return
    try:
        parsed = "Rows" in load_dataset(path, header_only=True)
    except InputError:
        parsed = False
    if not parsed:
        raise InputError(
            f"{path} is not a recognisable image: no PNG or NIfTI signature, no DICOM marker, and it "
            f"does not parse as a DICOM image. bsafuse reads {SUPPORTED_TEXT}"
        )


def _as_image(data: MedicalImage | ArrayLike, like: MedicalImage | None) -> MedicalImage:
    if isinstance(data, MedicalImage):
        return data
    pixels = np.asarray(data)
    colour = pixels.ndim == 3 and pixels.shape[-1] == 3 and not (like is not None and like.is_volume)
    return MedicalImage(pixels=pixels, is_colour=colour)


def write_image(
    path: str | os.PathLike[str],
    image_or_array: MedicalImage | ArrayLike,
    *,
    like: MedicalImage | None = None,
    anonymize: bool = False,
    description: str = "",
) -> Path:
    """Write pixels in [0, 1] to .png, .dcm, .nii or .nii.gz, atomically; returns the path.

    DICOM: a new series of `like`'s study (same study and frame of reference, its patient tags)
    where `like` came from DICOM, unless `anonymize`; `description` is its SeriesDescription.

    `like` (default: the image itself) supplies geometry, modality and the value range to write
    back: PNG is 8-bit, 16-bit for grey images whose `like` came from a file with more than 8 bits;
    DICOM stores integers in the source's range with RescaleSlope/Intercept (io/dicom.py); NIfTI
    stores float32 source values in `like`'s voxel order and affine (io/nifti.py). Volumes are
    written as volumes (not to PNG).

    Raises:
        InputError: pixels outside [0, 1], NaN, or a shape that differs from `like`'s.
        OutputError: unsupported suffix, or the file cannot be written.
    """
    path = Path(path)
    suffix = full_suffix(path)
    if suffix not in SUPPORTED:
        raise OutputError(
            f"cannot write {path}: unsupported suffix {suffix!r}; use one of {', '.join(SUPPORTED)}"
        )
    image = _as_image(image_or_array, like)
    like = like if like is not None else image
    if suffix != ".png" and image.shape != like.shape:
        raise InputError(
            f"{image.name} has shape {image.shape} but {like.name} (whose geometry it is written in) "
            f"has {like.shape}; resample it first (bsafuse.io.resample.resample_to)"
        )
    if image is not like:
        image = like.with_pixels(image.pixels, is_colour=image.is_colour)
    if image.is_colour and suffix in (".nii", ".nii.gz"):
        raise OutputError(f"cannot write colour to NIfTI ({path}); write .png or .dcm for colour images")
    with atomic_path(path) as tmp:
        if suffix == ".png":
            from bsafuse.io.png import write_png

            sixteen = like.source_format is not None and like.bit_depth > 8
            write_png(tmp, image, sixteen_bit=sixteen)
        elif suffix == ".dcm":
            from bsafuse.io.dicom_write import write_dicom

            write_dicom(tmp, image, image, anonymize=anonymize, description=description)
        else:
            from bsafuse.io.nifti import write_nifti

            write_nifti(tmp, image, image)
    return path
