"""DICOM: single slices, multi-frame files and one-series folders (read); slices and volumes (write).

Reading applies RescaleSlope/Intercept (per frame where the file has functional groups), so CT is in
Hounsfield units before the window of `intensity.py`; MONOCHROME1 is inverted; RGB, YBR and
PALETTE COLOR slices are read as colour. A multi-frame file or a folder is a volume, sorted along
the slice normal; `slice_index`/`axis` pick one slice of it (see `image.orient_volume`).
Compressed transfer syntaxes need decoders: `pip install "bsafuse[dicom-codecs]"`.

Written files are new objects: new Study/Series/SOP UIDs, patient and study fields present but
empty, nothing copied from the source but geometry, Modality and the intensity mapping. Output
pixels are integers in the source's stored range: `like`'s stored dtype with `like`'s
RescaleSlope/Intercept (so a CT comes back in HU), or, for float sources and bare arrays, uint16
with a RescaleSlope/Intercept that maps 0..65535 onto the source value range. Values outside the
reading map stay clipped (a CT read through the default 100/400 window comes back between -100 and
300 HU). WindowCenter/Width record the map from values to pixels. Volumes are one multi-frame file (frames along the slice
normal, positions in per-frame functional groups and in ImagePositionPatient of the first frame).

Patient tags are never read into messages or logs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec

import numpy as np
from numpy.typing import NDArray

from bsafuse.errors import InputError
from bsafuse.io.color import grey_if_channels_equal
from bsafuse.io.dicom_stack import build_image, frame_plane, frame_position, study_of
from bsafuse.io.geometry import geometry_from_matrix
from bsafuse.io.image import MedicalImage, check_size
from bsafuse.io.intensity import bit_depth_map

MAGIC = b"DICM"  # at byte offset 128, after the preamble
CODECS_HINT = 'pip install "bsafuse[dicom-codecs]"'
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
P = ParamSpec("P")


def pydicom_module() -> Any:
    """Import pydicom lazily; a missing install is an InputError with the pip line."""
    try:
        import pydicom
    except ImportError as exc:
        raise InputError("reading or writing DICOM needs pydicom: pip install pydicom") from exc
    return pydicom


def has_magic(path: Path) -> bool:
    """True when `path` has the 'DICM' marker at offset 128."""
    try:
        with path.open("rb") as f:
            return f.read(132)[128:] == MAGIC
    except OSError:
        return False  # unreadable: the reader reports it


def load_dataset(path: Path, *, header_only: bool = False) -> Any:
    """pydicom Dataset of `path` (any DICOM object), or InputError naming it."""
    pydicom = pydicom_module()
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=header_only)
    except Exception as exc:  # pydicom raises many types for damaged files
        raise InputError(
            f"{path} is not a readable DICOM file ({type(exc).__name__}); check it is complete"
        ) from exc
    if "TransferSyntaxUID" not in ds.file_meta:  # a bare dataset without file meta
        implicit, little = getattr(ds, "original_encoding", (True, True))
        uid = pydicom.uid
        syntax = uid.ImplicitVRLittleEndian if implicit else uid.ExplicitVRLittleEndian
        ds.file_meta.TransferSyntaxUID = syntax if little else uid.ExplicitVRBigEndian
    return ds


def read_dataset(path: Path, *, header_only: bool = False) -> Any:
    """pydicom Dataset of the DICOM image `path`, checked for pixel data and size."""
    ds = load_dataset(path, header_only=header_only)
    if not header_only and not any(tag in ds for tag in PIXEL_TAGS):
        raise InputError(f"{path} holds no pixel data (a DICOMDIR, report or other non-image object?)")
    if "Rows" not in ds or "Columns" not in ds:
        raise InputError(f"{path} is not a DICOM image: Rows/Columns are missing")
    check_size((int(ds.get("NumberOfFrames", 1) or 1), ds.Rows, ds.Columns), path)
    return ds


def _decoder_available(syntax: Any) -> bool:
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(syntax).is_available)
    except (ImportError, NotImplementedError, ValueError):
        return False


def decode(ds: Any, path: Path) -> NDArray[Any]:
    """The stored pixel values, (rows, cols), (frames, rows, cols) or with colour last."""
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # decoders raise anything from ValueError to RuntimeError
        try:
            compressed = bool(syntax.is_compressed)
        except ValueError:
            compressed = False
        reason = str(exc).split(" - ")[0].splitlines()[0][:160] if str(exc) else type(exc).__name__
        if compressed:
            # No decoder, or only one that cannot read this variant (Pillow and 12-bit JPEG Extended)
            lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
            why = "no installed decoder reads it" if not _decoder_available(syntax) else (
                f"the installed decoders cannot read it ({lines[0][:160] if lines else reason})"
            )
            raise InputError(
                f"{path} is compressed ({syntax.name}) and {why}; install the decoders with: {CODECS_HINT}"
            ) from exc
        raise InputError(
            f"{path}: its pixel data cannot be decoded ({reason}); the file may be truncated"
        ) from exc


def _not_a_series(folder: Path) -> str:
    """What to say about a folder given where an image was expected, when it is not a DICOM series."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    images = [p for p in files if p.name.lower().endswith((".png", ".nii", ".nii.gz"))]
    if not files:
        found = "it is empty"
    elif images:
        found = f"it holds {len(images)} PNG/NIfTI file(s), not a DICOM series"
    else:
        found = f"none of its {len(files)} file(s) is a DICOM image"
    return (
        f"{folder} is a folder, and a folder stands for one DICOM series, but {found}. Give an image "
        "file; to fuse folders pair by pair, give two folders (MOVING_DIR FIXED_DIR) and -o OUT_DIR"
    )


def _colour(path: Path, ds: Any, array: NDArray[Any], frames: int) -> MedicalImage:
    if frames > 1:
        raise InputError(f"{path} is a colour multi-frame file; bsafuse reads colour one slice at a time")
    if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        try:
            from pydicom.pixels import apply_color_lut
        except ImportError:  # pydicom < 3
            from pydicom.pixel_data_handlers.util import apply_color_lut  # type: ignore[no-redef]
        array = np.asarray(apply_color_lut(array, ds))
    array = grey_if_channels_equal(array)
    bits = 8 if array.dtype == np.uint8 or array.max() <= 255 else 16
    intensity = bit_depth_map(bits)
    frame = 0 if "PerFrameFunctionalGroupsSequence" in ds else None
    columns, position = frame_plane(ds, frame), frame_position(ds, frame)
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = columns, position if position is not None else 0.0
    spacing, origin, direction = geometry_from_matrix(matrix)
    return MedicalImage(
        pixels=intensity.normalise(array),
        spacing=spacing,
        origin=origin,
        direction=direction,
        modality=str(ds.get("Modality", "")).upper() or None,
        path=path,
        is_colour=array.ndim == 3,
        study=study_of(ds),
        source_format="dicom",
        source_dtype=f"uint{bits}",
        bit_depth=bits,
        intensity=intensity,
    )


def interprets_header(
    reader: Callable[Concatenate[Path, P], MedicalImage],
) -> Callable[Concatenate[Path, P], MedicalImage]:
    """Turn a malformed header value into an InputError naming the file.

    Damaged or non-standard files hold text where numbers belong (NumberOfFrames "abc"), one value
    where two belong (PixelSpacing), and so on; pydicom hands them over as they are, and converting
    them raises ValueError or TypeError. Only geometry and pixel-description tags are converted, so
    the detail never holds patient data.
    """

    @functools.wraps(reader)
    def wrapper(path: Path, *args: P.args, **kwargs: P.kwargs) -> MedicalImage:
        try:
            return reader(path, *args, **kwargs)
        except InputError:
            raise
        except (ValueError, TypeError) as exc:
            detail = " ".join(str(exc).split())[:120]
            raise InputError(
                f"{path}: its DICOM header holds a value that cannot be interpreted "
                f"({type(exc).__name__}: {detail}); the file is damaged or non-standard"
            ) from exc

    return wrapper


@interprets_header
def read_dicom_file(
    path: Path, *, slice_index: int | None = None, axis: str = "z", window: tuple[float, float] | None = None
) -> MedicalImage:
    """One DICOM file: a 2-D slice, or a volume when it holds several frames."""
    ds = read_dataset(path)
    array = decode(ds, path)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if int(ds.get("SamplesPerPixel", 1)) > 1 or str(ds.get("PhotometricInterpretation")) == "PALETTE COLOR":
        if window is not None:
            raise InputError(f"{path} is a colour image; a window applies to grey images only")
        return _colour(path, ds, array, n_frames)
    frames = list(array) if n_frames > 1 else [array]
    ids: list[int | None] = list(range(n_frames)) if n_frames > 1 else [None]
    return build_image(
        path, ds, frames, [ds] * len(frames), ids, slice_index=slice_index, axis=axis, window=window
    )


@interprets_header
def read_dicom_series(
    folder: Path,
    *,
    slice_index: int | None = None,
    axis: str = "z",
    window: tuple[float, float] | None = None,
) -> MedicalImage:
    """A folder holding one series (one file per slice) as a volume."""
    candidates = sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and (p.suffix.lower() in (".dcm", ".ima") or has_magic(p))
    )
    series: dict[str, list[Path]] = {}
    slice_shape: tuple[int, int] = (0, 0)
    for p in candidates:
        ds = load_dataset(p, header_only=True)
        if "Rows" not in ds:
            continue  # a DICOMDIR, report or other non-image object beside the slices
        series.setdefault(str(ds.get("SeriesInstanceUID", "(no SeriesInstanceUID)")), []).append(p)
        slice_shape = max(slice_shape, (int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)))
    if not series:
        raise InputError(_not_a_series(folder))
    if len(series) > 1:
        listing = "; ".join(f"{uid}: {len(files)} files" for uid, files in series.items())
        raise InputError(
            f"{folder} holds {len(series)} DICOM series ({listing}). Move each series into its own "
            "folder and pass that folder, or pass a single file"
        )
    candidates = next(iter(series.values()))
    check_size((len(candidates), *slice_shape), folder)  # before any slice's pixels are read
    datasets = [read_dataset(p) for p in candidates]
    frames = [decode(ds, p) for p, ds in zip(candidates, datasets, strict=True)]
    if any(f.shape != frames[0].shape or f.ndim != 2 for f in frames):
        raise InputError(
            f"{folder}: the slices differ in size or are multi-frame/colour; expected one 2-D grey slice per file"
        )
    return build_image(
        folder,
        datasets[0],
        frames,
        datasets,
        [None] * len(frames),
        slice_index=slice_index,
        axis=axis,
        window=window,
    )
