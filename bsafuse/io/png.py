"""PNG: 8/16-bit grey, RGB, RGBA (alpha dropped), palette (-> RGB), grey + alpha (-> grey).

Grey levels are normalised by bit depth (8-bit / 255, 16-bit / 65535; design.md §5). Colour is
read as 8-bit RGB (Pillow reduces 16-bit colour PNGs to 8 bits). The writer makes 8-bit PNGs,
16-bit for grey images whose `like` had more than 8 bits, and RGB for colour images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bsafuse.errors import InputError
from bsafuse.io.color import grey_if_channels_equal
from bsafuse.io.image import MedicalImage, check_size
from bsafuse.io.intensity import bit_depth_map

SIGNATURE = b"\x89PNG\r\n\x1a\n"
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N"}
COLOUR_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


def _ihdr_bit_depth(path: Path) -> int:
    """Bit depth from the IHDR chunk (byte 24), the only sure source across Pillow versions."""
    with path.open("rb") as f:
        header = f.read(25)
    return header[24] if len(header) == 25 else 8


def _check_ihdr_size(path: Path) -> None:
    """Refuse an oversized PNG from its IHDR chunk, before Pillow sees it.

    Pillow warns about (or raises on) "decompression bombs" itself, in its own words and on
    stderr; the header alone says enough to refuse the file with bsafuse's message.
    """
    with path.open("rb") as f:
        header = f.read(24)
    if len(header) == 24 and header[12:16] == b"IHDR":
        width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
        check_size((height, width), path)


def read_png(path: Path, *, window: tuple[float, float] | None = None) -> MedicalImage:
    """Read a PNG as a `MedicalImage` (no geometry: spacing 1, origin 0).

    `window` is refused: a PNG holds display grey levels, not Hounsfield units.
    """
    _check_ihdr_size(path)
    try:
        image = Image.open(path)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path} is not a readable PNG ({exc}); check the file is complete") from exc
    with image:
        check_size((image.height, image.width), path)
        mode = image.mode
        if mode not in GREY_MODES | COLOUR_MODES:
            raise InputError(f"{path}: PNG mode {mode!r} is not supported; save it as grey or RGB")
        try:
            image.load()
            if mode in COLOUR_MODES:
                array = grey_if_channels_equal(np.asarray(image.convert("RGB")))
            elif mode in ("1", "LA", "La"):
                array = np.asarray(image.convert("L"))
            else:
                array = np.asarray(image)
        except (OSError, ValueError, SyntaxError) as exc:
            raise InputError(f"{path} is truncated or corrupt ({exc}); re-export or re-download it") from exc
    bits = 16 if array.dtype != np.uint8 and _ihdr_bit_depth(path) == 16 else 8
    if array.dtype != np.uint8:  # 16-bit grey comes as I;16 or I (int32) depending on Pillow
        array = array.astype(np.uint16 if bits == 16 else np.uint8)
    colour = array.ndim == 3
    if window is not None:
        kind = "a colour image" if colour else f"a {bits}-bit PNG of display grey levels, not Hounsfield units"
        raise InputError(
            f"{path} is {kind}; a window applies to CT in HU (DICOM or NIfTI): leave out --window"
        )
    intensity = bit_depth_map(bits)
    return MedicalImage(
        pixels=intensity.normalise(array),
        path=path,
        is_colour=colour,
        source_format="png",
        source_dtype=str(array.dtype),
        bit_depth=bits,
        intensity=intensity,
    )


def write_png(path: Path, image: MedicalImage, *, sixteen_bit: bool) -> None:
    """Write `image` (2-D grey or RGB) as PNG: 8-bit, or 16-bit grey when `sixteen_bit`."""
    if image.is_volume:
        raise InputError(
            f"{image.name} is a volume of {image.shape[0]} slices; PNG holds one slice. "
            "Write .nii.gz or .dcm, or pick a slice with slice_index"
        )
    scale = 65535 if sixteen_bit and not image.is_colour else 255
    values = np.rint(image.pixels.astype(np.float64) * scale)
    array = values.astype(np.uint16 if scale == 65535 else np.uint8)
    Image.fromarray(array).save(path, format="PNG")
