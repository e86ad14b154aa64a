"""`MedicalImage`: pixels in [0, 1] plus everything a writer needs to put them back.

Geometry follows SimpleITK (LPS world coordinates, millimetres) and always has three components,
in index order (x = column, y = row, z = slice):

    world(x, y, z) = origin + direction @ (spacing * (x, y, z))      # direction: row-major 3x3

A 2-D image is one slice of that grid (z = 0), so a slice taken from a volume keeps its place in
space. Volumes are (D, H, W) = (z, y, x) arrays, the same layout as `SimpleITK.GetArrayFromImage`.
Files without geometry (PNG, bare arrays) get spacing 1, origin 0 and the identity direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bsafuse.errors import InputError
from bsafuse.io.geometry import geometry_matrix
from bsafuse.io.intensity import IntensityMap

MAX_SIDE = 8192  # pixels: larger images are refused (memory and decode time)
MAX_VOXELS = 512 * 512 * 1024  # voxels in a volume (1 GiB as float32): larger ones are refused
ROUNDING = 1e-6  # pixels this far outside [0, 1] (float rounding) are clipped, not refused
IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True, eq=False)
class NiftiLayout:
    """How a NIfTI file's voxel array maps onto `pixels`, so a writer can restore it exactly.

    `index_map` (4x4, integer) takes a pixel index (x=column, y=row, z=slice, 1) to the file's voxel
    index (i, j, k, 1); `shape` is the file's spatial shape (2 or 3 dims) for these pixels;
    `affine` is the file's own (RAS) affine, kept bit for bit.
    """

    affine: NDArray[np.float64]
    index_map: NDArray[np.int64]
    shape: tuple[int, ...]
    sform_code: int = 1
    qform_code: int = 1


# What a derived DICOM series copies from its source: the patient and general study modules.
# The type 2 ones must be present (empty when nothing is copied); StudyDescription is optional.
STUDY_TAGS_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
STUDY_TAGS = (*STUDY_TAGS_TYPE2, "StudyDescription")


@dataclass(frozen=True, eq=False)
class DicomStudy:
    """The study a DICOM image belongs to, so an output can join it as a derived series.

    Holds patient data: it is never printed, logged or put in a report (its repr says nothing), and
    only the DICOM writer reads it (io/dicom_write.py), unless told to anonymise.
    """

    study_uid: str
    frame_of_reference_uid: str | None
    tags: tuple[tuple[str, str], ...]  # (keyword, value) of STUDY_TAGS present in the source

    def __repr__(self) -> str:
        return "DicomStudy(<not shown>)"


@dataclass(frozen=True, eq=False)
class MedicalImage:
    """An image as bsafuse works with it.

    Attributes:
        pixels: float32 in [0, 1]; (H, W) grey, (H, W, 3) RGB (`is_colour`), or (D, H, W) volume.
        spacing, origin, direction: SimpleITK-style LPS geometry, three components (module docstring).
        modality: DICOM Modality ("CT", "MR", "PT", "NM", ...) or None where the file does not say.
        path: the source file or folder, None for arrays.
        source_format: "png", "dicom", "nifti" or None.
        source_dtype: numpy dtype name of the stored values ("uint8", "uint16", "int16", "float32").
        bit_depth: significant bits of the stored values (PNG bit depth, DICOM BitsStored).
        rescale: (slope, intercept) from stored to real values (DICOM Rescale*, NIfTI scl_*).
        intensity: the map from real values to pixels; `intensity.restore(pixels)` inverts it.
        nifti: for NIfTI sources, the layout that lets a writer restore the file's voxel order.
        study: for DICOM sources, the study an output joins as a derived series (never shown).
    """

    pixels: NDArray[np.float32]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = IDENTITY_DIRECTION
    modality: str | None = None
    path: Path | None = None
    is_colour: bool = False
    source_format: str | None = None
    source_dtype: str = "float32"
    bit_depth: int = 32
    rescale: tuple[float, float] = (1.0, 0.0)
    intensity: IntensityMap = field(default_factory=lambda: IntensityMap(0.0, 1.0, "unit"))
    nifti: NiftiLayout | None = None
    study: DicomStudy | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        name = self.path if self.path is not None else "the image array"
        pixels = np.asarray(self.pixels)
        if not np.issubdtype(pixels.dtype, np.number) or np.iscomplexobj(pixels):
            raise InputError(f"{name}: pixels must be real numbers, got dtype {pixels.dtype}")
        pixels = pixels.astype(np.float32, copy=False)
        object.__setattr__(self, "pixels", pixels)
        expected = "(H, W, 3)" if self.is_colour else "(H, W) or (D, H, W)"
        if (self.is_colour and (pixels.ndim != 3 or pixels.shape[-1] != 3)) or pixels.ndim not in (2, 3):
            raise InputError(f"{name}: pixels must have shape {expected}, got {pixels.shape}")
        if min(pixels.shape) == 0:
            raise InputError(f"{name}: image is empty, shape {pixels.shape}")
        finite = np.isfinite(pixels)
        if not finite.all():
            raise InputError(
                f"{name} holds {int(finite.size - finite.sum())} NaN or infinite values; "
                "replace them (e.g. numpy.nan_to_num) before using the image"
            )
        low, high = float(pixels.min()), float(pixels.max())
        if low < -ROUNDING or high > 1.0 + ROUNDING:
            raise InputError(
                f"{name}: pixels must lie in [0, 1], got [{low:.4g}, {high:.4g}]; normalise first"
            )
        if low < 0.0 or high > 1.0:
            object.__setattr__(self, "pixels", np.clip(pixels, 0.0, 1.0))
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise InputError(f"{name}: spacing and origin need 3 values and direction 9 (3x3, row-major)")
        for key in ("spacing", "origin", "direction"):
            object.__setattr__(self, key, tuple(float(v) for v in getattr(self, key)))
        if min(self.spacing) <= 0:
            raise InputError(f"{name}: spacing must be positive, got {self.spacing}")

    @property
    def is_volume(self) -> bool:
        """True for a (D, H, W) grey volume."""
        return self.pixels.ndim == 3 and not self.is_colour

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape: (H, W) or (D, H, W), without the colour channel."""
        return tuple(self.pixels.shape[:-1] if self.is_colour else self.pixels.shape)

    @property
    def affine(self) -> NDArray[np.float64] | None:
        """The NIfTI file's (RAS) affine for NIfTI sources, else None."""
        return None if self.nifti is None else self.nifti.affine

    @property
    def name(self) -> str:
        """What error messages call this image: its path, or 'the image array'."""
        return str(self.path) if self.path is not None else "the image array"

    def index_to_world(self) -> NDArray[np.float64]:
        """4x4 matrix taking (x, y, z, 1) pixel indices to LPS millimetres."""
        return geometry_matrix(self.spacing, self.origin, self.direction)

    def centre(self) -> NDArray[np.float64]:
        """The LPS position (mm) of the middle of the pixel grid."""
        depth = self.shape[0] if self.is_volume else 1
        height, width = self.shape[-2:]
        middle = np.array([(width - 1) / 2, (height - 1) / 2, (depth - 1) / 2, 1.0])
        return (self.index_to_world() @ middle)[:3]

    def centre_of_mass(self) -> NDArray[np.float64]:
        """The LPS position (mm) of the intensity-weighted centre of the pixels (grid centre if blank)."""
        grey = self.pixels.mean(axis=-1) if self.is_colour else self.pixels
        volume = grey if self.is_volume else grey[None]
        total = float(volume.sum())
        if total <= 0:
            return self.centre()
        z, y, x = (float((volume.sum(axis=tuple(a for a in range(3) if a != k)) * np.arange(n)).sum() / total)
                   for k, n in enumerate(volume.shape))  # fmt: skip
        return (self.index_to_world() @ np.array([x, y, z, 1.0]))[:3]

    def centred_on(self, other: MedicalImage, *, by_mass: bool = False) -> MedicalImage:
        """This image moved (origin only: spacing and direction kept) so its centre is `other`'s.

        `by_mass` matches the intensity-weighted centres instead of the grid centres.
        """
        shift = other.centre_of_mass() - self.centre_of_mass() if by_mass else other.centre() - self.centre()
        x, y, z = (float(v) for v in np.asarray(self.origin) + shift)
        return replace(self, origin=(x, y, z))

    def with_pixels(self, pixels: ArrayLike, **changes: Any) -> MedicalImage:
        """Same geometry and metadata, new pixels (and any field given in `changes`).

        Colour is kept when the new pixels are (H, W, 3) and this image is not a volume.
        """
        pixels = np.asarray(pixels)
        colour = pixels.ndim == 3 and pixels.shape[-1] == 3 and not self.is_volume
        return replace(self, pixels=pixels, **{"is_colour": colour, **changes})


def check_size(shape: tuple[int, ...], path: Path | str) -> None:
    """Refuse images with a side above MAX_SIDE pixels, or volumes above MAX_VOXELS voxels.

    Called with the sizes a header claims, before any pixel is decoded or memory is allocated, so
    a damaged or hostile header cannot exhaust memory.
    """
    if any(n > MAX_SIDE for n in shape):
        raise InputError(
            f"{path} is {' x '.join(map(str, shape))} pixels; bsafuse accepts at most {MAX_SIDE} "
            "per side. Downsample or crop it first"
        )
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise InputError(
            f"{path} is {' x '.join(map(str, shape))} voxels; bsafuse accepts volumes of at most "
            f"{MAX_VOXELS:,} voxels. Crop or downsample it first"
        )
