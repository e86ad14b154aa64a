"""DICOM writer (the conventions are in `dicom.py`'s docstring).

Slices are Secondary Capture objects and volumes Multi-frame Grayscale Byte/Word Secondary Capture
objects: bsafuse outputs are derived images, and these classes carry geometry (ImagePosition/
Orientation, PixelSpacing, per-frame functional groups) without claiming a scanner acquisition.
Modality is `like`'s, so reading the file back picks the same intensity defaults.
"""

from __future__ import annotations

import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bsafuse._version import __version__
from bsafuse.io.dicom import pydicom_module
from bsafuse.io.image import STUDY_TAGS_TYPE2, MedicalImage

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_SC = {8: "1.2.840.10008.5.1.4.1.1.7.2", 16: "1.2.840.10008.5.1.4.1.1.7.3"}  # by bits allocated
# type 2: present, left empty unless the output joins its source's study
EMPTY_TAGS = (*STUDY_TAGS_TYPE2, "SeriesNumber", "InstanceNumber")


def _ds(value: float) -> Any:
    """A float as a DICOM decimal string of at most 16 characters."""
    return pydicom_module().valuerep.DSfloat(float(value), auto_format=True)


def _stored(image: MedicalImage, like: MedicalImage) -> tuple[NDArray[Any], float, float]:
    """Integer stored values and the (slope, intercept) that turn them into source values."""
    imap = like.intensity
    dtype = np.dtype(like.source_dtype)
    if dtype.kind in "iu" and dtype.itemsize <= 2 and like.rescale[0] != 0:
        slope, intercept = like.rescale
    else:  # float or wide source: 0..65535 spans the value range
        dtype = np.dtype(np.uint16)
        low, high = sorted((imap.low, imap.high))
        slope, intercept = ((high - low) / 65535 or 1.0), low
    slope, intercept = float(_ds(slope)), float(_ds(intercept))  # quantise as they are stored
    values = (imap.restore(image.pixels) - intercept) / slope
    info = np.iinfo(dtype)
    return np.clip(np.rint(values), info.min, info.max).astype(dtype), slope, intercept


def _frame_positions(image: MedicalImage) -> tuple[list[NDArray[np.float64]], NDArray[np.float64], bool]:
    """Positions of the frames, the 3x3 step matrix and whether frames go in reverse z order.

    Frames are written along +normal (row direction x column direction), the order every reader
    agrees on, whatever the handedness of the image's own z axis.
    """
    matrix = image.index_to_world()
    steps = matrix[:3, :3].copy()
    depth = image.shape[0] if image.is_volume else 1
    reverse = depth > 1 and float(np.cross(steps[:, 0], steps[:, 1]) @ steps[:, 2]) < 0
    origin = matrix[:3, 3] + (steps[:, 2] * (depth - 1) if reverse else 0.0)
    if reverse:
        steps[:, 2] = -steps[:, 2]
    return [origin + k * steps[:, 2] for k in range(depth)], steps, reverse


def _geometry(ds: Any, image: MedicalImage) -> NDArray[Any]:
    """Set position/orientation/spacing tags; return the pixels in frame order."""
    pydicom = pydicom_module()
    Dataset, Sequence = pydicom.dataset.Dataset, pydicom.sequence.Sequence
    positions, steps, reverse = _frame_positions(image)
    spacing = np.linalg.norm(steps, axis=0)
    orientation = [_ds(v) for v in np.concatenate([steps[:, 0] / spacing[0], steps[:, 1] / spacing[1]])]
    ds.ImagePositionPatient = [_ds(v) for v in positions[0]]
    ds.ImageOrientationPatient = orientation
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # row spacing (y), column spacing (x)
    ds.SliceThickness = _ds(spacing[2])
    if len(positions) == 1:
        return image.pixels
    ds.NumberOfFrames = len(positions)
    ds.SpacingBetweenSlices = _ds(spacing[2])
    normal = np.cross(steps[:, 0], steps[:, 1]) / (spacing[0] * spacing[1])
    ds.SliceLocationVector = [_ds(p @ normal) for p in positions]
    ds.FrameIncrementPointer = pydicom.tag.Tag("SliceLocationVector")
    measures, plane = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = ds.PixelSpacing, ds.SliceThickness
    measures.SpacingBetweenSlices = ds.SpacingBetweenSlices
    plane.ImageOrientationPatient = orientation
    shared = Dataset()
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([plane])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for p in positions:
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [_ds(v) for v in p]
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    return image.pixels[::-1] if reverse else image.pixels


def write_dicom(
    path: Path, image: MedicalImage, like: MedicalImage, *, anonymize: bool = False, description: str = ""
) -> None:
    """Write `image` (pixels) in `like`'s geometry, modality and value range to `path`.

    Where `like` came from a DICOM study, the output is a new series of that study: the same study
    and frame of reference (so viewers overlay it on `like`), the patient and study tags of `like`,
    new series and instance UIDs. `anonymize` (or a `like` without a study) gives a new study and
    frame of reference with the patient tags present but empty. `description` becomes the
    SeriesDescription ("bsafuse output" when empty).
    """
    pydicom = pydicom_module()
    uid = pydicom.uid
    ds = pydicom.dataset.Dataset()
    for keyword in EMPTY_TAGS:
        setattr(ds, keyword, "")
    study = None if anonymize else like.study
    if study is not None:
        with warnings.catch_warnings():  # pydicom's validation would quote a value it dislikes
            warnings.simplefilter("ignore")
            for keyword, value in study.tags:
                setattr(ds, keyword, value)
        ds.StudyInstanceUID = study.study_uid
        ds.FrameOfReferenceUID = study.frame_of_reference_uid or uid.generate_uid()
    else:
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = uid.generate_uid(), uid.generate_uid()
    ds.SeriesInstanceUID, ds.SOPInstanceUID = uid.generate_uid(), uid.generate_uid()
    ds.Modality = like.modality or "OT"
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesDescription = description or "bsafuse output"
    ds.SoftwareVersions = f"bsafuse {__version__}"
    ds.ContentDate = datetime.now(UTC).strftime("%Y%m%d")
    ds.Rows, ds.Columns = image.shape[-2:]
    ordered = _geometry(ds, image)
    if image.is_colour:
        stored = np.rint(image.pixels.astype(np.float64) * 255).astype(np.uint8)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    else:
        stored, slope, intercept = _stored(image.with_pixels(ordered), like)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = (
            "MONOCHROME1" if like.intensity.high < like.intensity.low else "MONOCHROME2"
        )
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(slope), _ds(intercept), "US"
        center, width = like.intensity.window
        if width > 0:
            ds.WindowCenter, ds.WindowWidth = _ds(center), _ds(width)
    bits = stored.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = int(stored.dtype.kind == "i")
    ds.PixelData = np.ascontiguousarray(stored).astype(stored.dtype.newbyteorder("<")).tobytes()
    sop_class = MULTIFRAME_SC[bits] if "NumberOfFrames" in ds else SECONDARY_CAPTURE
    ds.SOPClassUID = sop_class
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    with warnings.catch_warnings():  # the source's own values, copied as they were: no complaints quoted
        warnings.simplefilter("ignore")
        try:
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
        except TypeError:  # pydicom < 3
            ds.is_little_endian, ds.is_implicit_VR = True, False
            pydicom.dcmwrite(path, ds, write_like_original=False)
