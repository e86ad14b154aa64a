"""NIfTI (.nii, .nii.gz): 2-D and 3-D images, one volume of a 4-D file, affine kept bit for bit.

Axis convention. Volumes come out in LPS order, like DICOM and SimpleITK: (D, H, W) with the
column index running toward the patient's left, the row index toward posterior and the slice index
toward superior (each along the file's voxel axis closest to that direction; oblique files stay
oblique, only axes are swapped or reversed, never resampled). `axis` names the world direction a
slice is taken across: "z" axial, "y" coronal, "x" sagittal, and `slice_index` counts voxels in
the file's own order along the file axis closest to that direction, exactly as
`nibabel.load(f).dataobj` or a viewer's voxel coordinates count them. So for a file stored RAS
(nibabel's canonical order) `read_image(f, slice_index=k, axis="z")` is `dataobj[:, :, k]` shown
radiologically: anterior up and the patient's left on the image's right, i.e. the data transposed
and with both axes reversed. Coronal and sagittal slices have superior up (see `image.view_map`).

Intensities: percentiles (or the given window) of the whole file, after scl_slope/scl_inter. The
writer stores float32 source values (`like.intensity.restore`; values outside the reading map
stay clipped) in `like`'s voxel order and affine, with `like`'s sform/qform codes; a slice taken
from a volume is written as a one-slice volume in its place. Without a NIfTI `like` the voxel
order is the pixels' own LPS order and the affine is the image geometry converted to RAS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bsafuse.errors import InputError, OutputError
from bsafuse.io.geometry import geometry_from_matrix, orient_volume, reorder
from bsafuse.io.image import MedicalImage, NiftiLayout, check_size
from bsafuse.io.intensity import choose_map

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # also RAS -> LPS
SUFFIXES = (".nii", ".nii.gz")


def nibabel_module() -> Any:
    """Import nibabel lazily; a missing install is an InputError with the pip line."""
    try:
        import nibabel
    except ImportError as exc:
        raise InputError("reading or writing NIfTI needs nibabel: pip install nibabel") from exc
    return nibabel


def _load(path: Path, volume: int | None) -> tuple[Any, NDArray[np.float64]]:
    nib = nibabel_module()
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError, ValueError, ...
        raise InputError(f"{path} is not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    shape = tuple(img.shape)
    if len(shape) > 3 and all(n == 1 for n in shape[4:]) and (shape[3] == 1 or volume is not None):
        index = volume or 0
        if not 0 <= index < shape[3]:
            raise InputError(
                f"volume {index} is outside {path}: it holds {shape[3]} volumes (0 to {shape[3] - 1})"
            )
        proxy: Any = img.dataobj[..., index] if len(shape) == 4 else img.dataobj[:, :, :, index, ...]
    elif len(shape) > 3:
        raise InputError(
            f"{path} is {len(shape)}-D, shape {shape}; bsafuse reads one 3-D volume at a time: extract "
            f"one first (e.g. fslroi IN OUT N 1), or in Python pass volume=N to read_image (0 to {shape[3] - 1})"
        )
    elif len(shape) < 2:
        raise InputError(f"{path} has shape {shape}; expected a 2-D image or a 3-D volume")
    else:
        proxy = img.dataobj
    check_size(shape[:3], path)
    if np.dtype(img.get_data_dtype()).fields is not None:
        raise InputError(
            f"{path} stores RGB voxels; bsafuse reads grey NIfTI only (convert to PNG/DICOM for colour)"
        )
    try:
        stored = np.dtype(img.get_data_dtype())
        dtype = np.float32 if stored.itemsize <= 2 or stored == np.float32 else np.float64
        data = np.asarray(proxy, dtype=dtype).reshape(shape[:3])
    except Exception as exc:  # truncated or corrupt data block
        raise InputError(
            f"{path}: voxel data cannot be read ({type(exc).__name__}); the file may be truncated"
        ) from exc
    return img, data


def read_nifti(
    path: Path,
    *,
    slice_index: int | None = None,
    axis: str = "z",
    window: tuple[float, float] | None = None,
    volume: int | None = None,
) -> MedicalImage:
    """Read a .nii/.nii.gz file (module docstring: axis convention, intensities)."""
    img, data = _load(path, volume)
    finite = np.isfinite(data)
    if not finite.all():
        raise InputError(
            f"{path} holds {int(data.size - finite.sum())} NaN or infinite voxels; replace them "
            "(e.g. fslmaths in -nan out) before fusing"
        )
    file_ndim = data.ndim
    data3: NDArray[Any] = data.reshape(data.shape + (1,) * (3 - data.ndim))  # (i, j, k)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():  # checked at reading, before any work (and before numpy warns)
        raise InputError(
            f"{path}: its affine (sform/qform) holds NaN or infinite values, so where its voxels lie is "
            "unknown; fix the header (e.g. set a valid sform with nibabel or fslorient) and try again"
        )
    try:
        pixels, matrix, index_map = orient_volume(
            data3.transpose(2, 1, 0), LPS_TO_RAS @ affine, slice_index=slice_index, axis=axis, path=path
        )
        spacing, origin, direction = geometry_from_matrix(matrix)
    except (ValueError, np.linalg.LinAlgError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: its affine is singular ({exc}); fix the header (sform/qform)") from exc
    file_shape = (int(data3.shape[0]), int(data3.shape[1]), int(data3.shape[2]))
    shape, file_map, slab_affine = _slab_layout(affine, index_map, pixels.shape, file_shape, file_ndim)
    header = img.header
    intensity = choose_map(data, modality=None, window=window)
    slope, inter = header.get_slope_inter() if hasattr(header, "get_slope_inter") else (None, None)
    return MedicalImage(
        pixels=intensity.normalise(pixels),
        spacing=spacing,
        origin=origin,
        direction=direction,
        path=path,
        source_format="nifti",
        source_dtype=str(np.dtype(img.get_data_dtype())),
        bit_depth=8 * np.dtype(img.get_data_dtype()).itemsize,
        rescale=(
            float(slope) if slope is not None and np.isfinite(slope) else 1.0,
            float(inter) if inter is not None and np.isfinite(inter) else 0.0,
        ),
        intensity=intensity,
        nifti=NiftiLayout(
            slab_affine,
            file_map,
            shape,
            sform_code=int(header["sform_code"]),
            qform_code=int(header["qform_code"]),
        ),
    )


def _slab_layout(
    affine: NDArray[np.float64],
    index_map: NDArray[np.int64],
    pixel_shape: tuple[int, ...],
    file_shape: tuple[int, int, int],
    file_ndim: int,
) -> tuple[tuple[int, ...], NDArray[np.int64], NDArray[np.float64]]:
    """(file shape, index map, affine) of the part of the file the pixels cover (all, or one slice)."""
    pixel_xyz = (*pixel_shape[::-1], 1)[:3]
    corners = np.array(
        [
            [x, y, z, 1]
            for x in (0, pixel_xyz[0] - 1)
            for y in (0, pixel_xyz[1] - 1)
            for z in (0, pixel_xyz[2] - 1)
        ]
    )
    covered = corners @ index_map.T
    offset = covered[:, :3].min(axis=0)
    shape = tuple(int(n) for n in covered[:, :3].max(axis=0) - offset + 1)
    if shape == file_shape:
        return (shape[:file_ndim] if file_ndim == 2 else shape), index_map, affine
    shift = np.eye(4, dtype=np.int64)
    shift[:3, 3] = -offset
    return shape, shift @ index_map, affine @ np.linalg.inv(shift)


def write_nifti(path: Path, image: MedicalImage, like: MedicalImage) -> None:
    """Write `image` as float32 source values in `like`'s voxel order and affine."""
    nib = nibabel_module()
    if image.is_colour:
        raise OutputError(f"cannot write colour to NIfTI ({path}); write .png or .dcm for colour images")
    pixel_xyz = image.pixels.T[:, :, None] if image.pixels.ndim == 2 else image.pixels.transpose(2, 1, 0)
    layout = like.nifti
    if layout is None:
        shape = pixel_xyz.shape[: image.pixels.ndim]
        layout = NiftiLayout(LPS_TO_RAS @ like.index_to_world(), np.eye(4, dtype=np.int64), shape)
    values = like.intensity.restore(reorder(pixel_xyz, layout.index_map)).astype(np.float32)
    if values.shape != (*layout.shape, 1, 1)[:3]:
        raise OutputError(f"cannot write {path}: pixels do not fit the NIfTI layout of {like.name}")
    out = nib.Nifti1Image(values.reshape(layout.shape), layout.affine)
    out.header.set_xyzt_units("mm")
    out.set_sform(layout.affine, code=layout.sform_code or 2)
    if layout.qform_code:
        out.set_qform(layout.affine, code=layout.qform_code)
    else:
        out.set_qform(None, code=0)
    nib.save(out, path)
