"""Frames -> one `MedicalImage`: per-frame rescale and position, sorting along the slice normal.

The frames come from one multi-frame file (functional groups, RT dose offsets or legacy tags) or
from a folder of single-frame files; `dicom.py` decodes them, this module places them in space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bsafuse.errors import InputError
from bsafuse.io.geometry import geometry_from_matrix, orient_volume
from bsafuse.io.image import STUDY_TAGS, DicomStudy, MedicalImage
from bsafuse.io.intensity import choose_map


def _attr(ds: Any, frame: int | None, group: str, name: str) -> Any:
    """An attribute from the frame's functional group, the shared group, or the top level."""
    sources = []
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
        sources.append(ds.PerFrameFunctionalGroupsSequence[frame])
    if "SharedFunctionalGroupsSequence" in ds:
        sources.append(ds.SharedFunctionalGroupsSequence[0])
    for item in sources:
        if group in item and len(item[group].value) and name in item[group][0]:
            return item[group][0][name].value
    return ds.get(name)


def _rescale(ds: Any, frame: int | None) -> tuple[float, float]:
    slope = _attr(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _attr(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    return float(slope if slope not in (None, "") else 1.0), float(
        intercept if intercept not in (None, "") else 0.0
    )


def frame_plane(ds: Any, frame: int | None) -> NDArray[np.float64]:
    """3x3 matrix whose columns step one column, one row and one slice of a frame, in LPS mm."""
    orientation = _attr(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = _attr(ds, frame, "PixelMeasuresSequence", "PixelSpacing") or ds.get("ImagerPixelSpacing")
    between = _attr(ds, frame, "PixelMeasuresSequence", "SpacingBetweenSlices")
    thickness = _attr(ds, frame, "PixelMeasuresSequence", "SliceThickness")
    row_dir, col_dir = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])  # when absent or degenerate
    if orientation and len(orientation) == 6:
        row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
        if np.linalg.norm(np.cross(row, col)) > 1e-3:
            row_dir, col_dir = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    d_row, d_col = (1.0, 1.0)
    if spacing and len(spacing) == 2 and min(float(spacing[0]), float(spacing[1])) > 0:
        d_row, d_col = float(spacing[0]), float(spacing[1])
    d_slice = next((float(v) for v in (between, thickness) if v not in (None, "") and float(v) > 0), 1.0)
    return np.stack([row_dir * d_col, col_dir * d_row, normal * d_slice], axis=1)


def frame_position(ds: Any, frame: int | None) -> NDArray[np.float64] | None:
    """Where a frame's first pixel lies: its functional group, RT dose offsets, or the top level."""
    top = ds.get("ImagePositionPatient")
    top = np.array(top, float) if top is not None and len(top) == 3 else None
    if frame is None:
        return top
    groups = ds.get("PerFrameFunctionalGroupsSequence")
    if groups and "PlanePositionSequence" in groups[frame]:
        value = groups[frame].PlanePositionSequence[0].get("ImagePositionPatient")
        return np.array(value, float) if value is not None and len(value) == 3 else None
    offsets = ds.get("GridFrameOffsetVector")  # RT dose: offsets along the normal
    if top is not None and offsets is not None and len(offsets) > frame:
        normal = frame_plane(ds, frame)[:, 2]
        start = float(offsets[0]) if abs(float(offsets[0]) - top[2]) < 1e-3 else 0.0  # absolute z form
        return top + (float(offsets[frame]) - start) * normal / np.linalg.norm(normal)
    return top if frame == 0 else None  # legacy multi-frame: stored order, spacing from the header


def _stack_matrix(
    columns: NDArray[np.float64], positions: list[NDArray[np.float64] | None], path: Path
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Index -> LPS matrix of frames sorted along the normal, and the sorting order."""
    matrix = np.eye(4)
    matrix[:3, :3] = columns
    if any(p is None for p in positions):
        matrix[:3, 3] = next((p for p in positions if p is not None), np.zeros(3))
        return matrix, np.arange(len(positions))
    normal = columns[:, 2] / np.linalg.norm(columns[:, 2])
    along = np.array([float(p @ normal) for p in positions if p is not None])
    order = np.argsort(along, kind="stable")
    matrix[:3, 3] = positions[int(order[0])]
    if len(order) > 1:
        steps = np.diff(along[order])
        if steps.min() < 1e-4:
            raise InputError(
                f"{path}: several slices share one position (a time series or two stacks?); "
                "export one 3-D volume per series"
            )
        if steps.max() - steps.min() > 0.1 * float(np.median(steps)):
            raise InputError(
                f"{path}: slice spacing is uneven ({steps.min():.3g} to {steps.max():.3g} mm; missing "
                "slices?); bsafuse needs a regular grid"
            )
        matrix[:3, 2] = normal * float(np.mean(steps))
    return matrix, order


def build_image(
    path: Path,
    ds: Any,
    frames: list[NDArray[Any]],
    datasets: list[Any],
    frame_ids: list[int | None],
    *,
    slice_index: int | None,
    axis: str,
    window: tuple[float, float] | None,
) -> MedicalImage:
    """A MedicalImage from decoded grey frames (one per slice) and where each came from."""
    modality = str(ds.get("Modality", "")).upper() or None
    rescales = [_rescale(d, f) for d, f in zip(datasets, frame_ids, strict=True)]
    positions = [frame_position(d, f) for d, f in zip(datasets, frame_ids, strict=True)]
    matrix, order = _stack_matrix(frame_plane(ds, frame_ids[0]), positions, path)
    values = np.stack([frames[i] * rescales[i][0] + rescales[i][1] for i in order])
    finite = np.isfinite(values)
    if not finite.all():
        raise InputError(f"{path} holds {int(values.size - finite.sum())} NaN or infinite values")
    if slice_index is not None and len(frames) == 1:
        raise InputError(f"slice_index was given but {path} is a single 2-D slice; leave it out")
    pixels, matrix, _ = orient_volume(values, matrix, slice_index=slice_index, axis=axis, path=path)
    intensity = choose_map(values, modality=modality, window=window)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        intensity = type(intensity)(intensity.high, intensity.low, intensity.method)
    spacing, origin, direction = geometry_from_matrix(matrix)
    return MedicalImage(
        pixels=intensity.normalise(pixels),
        spacing=spacing,
        origin=origin,
        direction=direction,
        modality=modality,
        path=path,
        source_format="dicom",
        source_dtype=str(frames[0].dtype),
        bit_depth=int(ds.get("BitsStored", 8 * frames[0].dtype.itemsize)),
        rescale=rescales[0],
        intensity=intensity,
        study=study_of(ds),
    )


def study_of(ds: Any) -> DicomStudy | None:
    """The study of a dataset (None without a StudyInstanceUID): UIDs and the patient/study tags."""
    study_uid = str(ds.get("StudyInstanceUID", "") or "")
    if not study_uid:
        return None
    tags = tuple((k, str(ds.get(k))) for k in STUDY_TAGS if ds.get(k) not in (None, ""))
    frame = str(ds.get("FrameOfReferenceUID", "") or "") or None
    return DicomStudy(study_uid, frame, tags)
