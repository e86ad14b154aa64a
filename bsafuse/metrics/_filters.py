"""Input checks and the small numpy filters the metrics share (no scipy: runtime deps are fixed).

Every filter is written as a correlation; the kernels used here are symmetric (Gaussian) or enter
only through magnitudes and ratios that are sign-blind (Sobel), so correlation and MATLAB's
`conv2` give the same numbers.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import ArrayLike

from bsafuse.errors import InputError

LUMA = np.array([0.299, 0.587, 0.114])  # BT.601 full-range Y weights of R, G, B (as bsafuse.io.color)


def as_grey(image: ArrayLike, *, name: str) -> np.ndarray:
    """An (H, W) grey or (H, W, 3) RGB array -> (H, W) float64; RGB becomes its BT.601 luma Y.

    Y is not rounded, and no intensity scaling happens: 0..255 in, 0..255 out.
    """
    x = np.asarray(image)
    if x.ndim == 3 and x.shape[-1] == 3:
        x = x.astype(np.float64) @ LUMA  # (H, W, 3) -> (H, W)
    elif x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 2:
        raise InputError(
            f"{name} must be a grey (H, W) or colour (H, W, 3) image, got shape {np.shape(image)}"
        )
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise InputError(f"{name} contains NaN or infinite values; metrics need finite grey values")
    return x


def as_grey_images(min_size: int = 1, **images: ArrayLike) -> list[np.ndarray]:
    """Convert each keyword image with `as_grey`; all must share one (H, W) of at least `min_size`."""
    greys = [as_grey(image, name=name) for name, image in images.items()]
    if len({g.shape for g in greys}) > 1:
        shapes = ", ".join(f"{name} {np.shape(image)}" for name, image in images.items())
        raise InputError(f"{', '.join(images)} must have the same height and width, got {shapes}")
    if min(greys[0].shape) < min_size:
        raise InputError(
            f"images must be at least {min_size}x{min_size} pixels for this metric, got {greys[0].shape}"
        )
    return greys


def gaussian_taps(size: int, sigma: float) -> np.ndarray:
    """1-D Gaussian of `size` taps, normalised to sum 1; its outer product is fspecial's 2-D window."""
    x = np.arange(size) - (size - 1) / 2
    taps = np.exp(-(x**2) / (2 * sigma**2))
    return taps / taps.sum()


def filter_valid(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation of the last two axes with outer(taps, taps), 'valid' positions only.

    Shapes: (..., H, W) -> (..., H - n + 1, W - n + 1) for n taps.
    """
    n = taps.size
    rows = sliding_window_view(x, n, axis=-2) @ taps  # (..., H-n+1, W)
    return sliding_window_view(rows, n, axis=-1) @ taps  # (..., H-n+1, W-n+1)


def sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel (d/dx, d/dy) of `x` with zero padding, same size as `x` (x = columns, y = rows).

    Exact for integer-valued input: only additions and multiplications by 2 happen.
    """
    p = np.pad(x, 1)
    smooth_y = p[:-2] + 2 * p[1:-1] + p[2:]  # (H, W + 2): [1 2 1] down the rows
    diff_y = p[2:] - p[:-2]  # (H, W + 2)
    gx = smooth_y[:, 2:] - smooth_y[:, :-2]  # (H, W)
    gy = diff_y[:, :-2] + 2 * diff_y[:, 1:-1] + diff_y[:, 2:]  # (H, W)
    return gx, gy


def block_sums(x: np.ndarray, block: int) -> np.ndarray:
    """Sums over non-overlapping block x block tiles; the last row/column of tiles is zero-padded.

    Shapes: (H, W) -> (ceil(H / block), ceil(W / block)).
    """
    h, w = x.shape
    x = np.pad(x, ((0, -h % block), (0, -w % block)))
    return x.reshape(x.shape[0] // block, block, x.shape[1] // block, block).sum(axis=(1, 3))
