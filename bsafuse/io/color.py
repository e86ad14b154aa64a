"""RGB <-> YCbCr, ITU-R BT.601 full range (as in JPEG/JFIF), on floats in [0, 1].

    Y  =  0.299 R + 0.587 G + 0.114 B
    Cb = (B - Y) / 1.772 + 0.5
    Cr = (R - Y) / 1.402 + 0.5

Greys (R = G = B) have Cb = Cr = 0.5 exactly, and the inverse is the exact matrix inverse, so a
round trip returns the input to float rounding. (The authors' code used a wrong green coefficient
that brightened greys by about 7 %; design.md §2a.) Channels are last: (..., 3).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

KR, KB = 0.299, 0.114  # BT.601 luma weights of red and blue; green is 1 - KR - KB
_RGB_TO_YCBCR = np.array(
    [
        [KR, 1 - KR - KB, KB],
        [-KR / (2 - 2 * KB), -(1 - KR - KB) / (2 - 2 * KB), 0.5],
        [0.5, -(1 - KR - KB) / (2 - 2 * KR), -KB / (2 - 2 * KR)],
    ]
)
_YCBCR_TO_RGB = np.linalg.inv(_RGB_TO_YCBCR)
_CHROMA_OFFSET = np.array([0.0, 0.5, 0.5])  # Cb and Cr are centred at 0.5


def _check_channels(array: NDArray[np.floating], name: str) -> None:
    if array.ndim < 1 or array.shape[-1] != 3:
        raise ValueError(f"{name} must have 3 channels last, shape (..., 3), got {array.shape}")


def _float(array: ArrayLike) -> NDArray[np.floating]:
    out = np.asarray(array)
    return out if out.dtype in (np.float32, np.float64) else out.astype(np.float32)


def grey_if_channels_equal(pixels: NDArray[Any]) -> NDArray[Any]:
    """(H, W, 3) with R = G = B everywhere -> (H, W); anything else is returned as it is.

    Grey images are often stored as RGB, RGBA or palette files (the BSAFusion authors' published
    CT and MRI test pairs, ITK's example slices): they are grey, get grey weights and a grey output.
    """
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        first = pixels[..., 0]
        if np.array_equal(first, pixels[..., 1]) and np.array_equal(first, pixels[..., 2]):
            return np.ascontiguousarray(first)
    return pixels


def rgb_to_ycbcr(rgb: ArrayLike) -> NDArray[np.floating]:
    """(..., 3) RGB in [0, 1] -> (..., 3) Y, Cb, Cr in [0, 1], same float dtype (float32 for ints)."""
    rgb = _float(rgb)
    _check_channels(rgb, "rgb")
    out = rgb.astype(np.float64) @ _RGB_TO_YCBCR.T + _CHROMA_OFFSET
    return out.astype(rgb.dtype)


def ycbcr_to_rgb(ycbcr: ArrayLike) -> NDArray[np.floating]:
    """(..., 3) Y, Cb, Cr -> (..., 3) RGB, clipped to [0, 1].

    Clipping matters when Y comes from elsewhere (the fused image) and the combination with the
    original chroma falls outside the RGB cube; in-gamut values are untouched.
    """
    ycbcr = _float(ycbcr)
    _check_channels(ycbcr, "ycbcr")
    out = (ycbcr.astype(np.float64) - _CHROMA_OFFSET) @ _YCBCR_TO_RGB.T
    return np.clip(out, 0.0, 1.0).astype(ycbcr.dtype)
