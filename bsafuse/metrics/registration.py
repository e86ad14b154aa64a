"""Registration metrics: end-point error, NCC, normalised mutual information, SSIM and folding, in numpy.

Flows follow bsafuse's convention (bsafuse.warp): displacements in pixels, (2, H, W) or
(N, 2, H, W), channel 0 = x (columns), channel 1 = y (rows). Array-likes are accepted, so CPU
torch tensors work too (through ``np.asarray``).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from bsafuse.errors import InputError
from bsafuse.metrics._filters import as_grey_images
from bsafuse.metrics.fusion import ssim_map


def _as_flow(flow: ArrayLike, *, name: str) -> np.ndarray:
    """(2, H, W) or (N, 2, H, W) -> (N, 2, H, W) float64."""
    x = np.asarray(flow, dtype=np.float64)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 2:
        raise InputError(f"{name} must have shape (2, H, W) or (N, 2, H, W), got {np.shape(flow)}")
    return x


def _as_mask(mask: ArrayLike | None, shape: tuple[int, ...]) -> np.ndarray:
    """None or a mask broadcastable to `shape` (N, H, W) -> boolean array of that shape."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(mask)
    if m.ndim == len(shape) + 1 and m.shape[1] == 1:  # (N, 1, H, W) -> (N, H, W)
        m = m[:, 0]
    try:
        m = np.broadcast_to(m != 0, shape)
    except ValueError:
        raise InputError(
            f"mask of shape {np.shape(mask)} does not fit images/flows of shape {shape}"
        ) from None
    if not m.any():
        raise InputError("mask selects no pixel; give a mask with at least one non-zero entry")
    return m


def endpoint_error(flow: ArrayLike, flow_true: ArrayLike, mask: ArrayLike | None = None) -> dict[str, float]:
    """End-point error |flow - flow_true| in pixels: {"mean": ..., "p95": ...} over all pixels.

    `mask` (H, W), (N, H, W) or (N, 1, H, W), non-zero = counted, restricts the pixels (e.g. to
    the fixed image's foreground). p95 is numpy's linearly interpolated 95th percentile.
    """
    f, t = _as_flow(flow, name="flow"), _as_flow(flow_true, name="flow_true")
    if f.shape != t.shape:
        raise InputError(
            f"flow and flow_true must have the same shape, got {np.shape(flow)} and {np.shape(flow_true)}"
        )
    error = np.sqrt(np.sum((f - t) ** 2, axis=1))  # (N, H, W)
    selected = error[_as_mask(mask, error.shape)]
    return {"mean": float(selected.mean()), "p95": float(np.percentile(selected, 95))}


def ncc(a: ArrayLike, b: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Global normalised cross-correlation of two images (Pearson's r over the pixels); -1..1.

    Scale- and offset-free, so any intensity range works. `mask` (H, W), non-zero = counted,
    restricts the pixels. NaN when either image is constant there.
    """
    x, y = as_grey_images(a=a, b=b)
    m = _as_mask(mask, x.shape)
    x, y = x[m] - x[m].mean(), y[m] - y[m].mean()
    denominator = math.sqrt(float(np.sum(x * x)) * float(np.sum(y * y)))
    return float(np.sum(x * y)) / denominator if denominator > 0 else math.nan


def normalised_mutual_information(a: ArrayLike, b: ArrayLike, *, bins: int = 32) -> float:
    """Studholme's normalised mutual information (H(A) + H(B)) / H(A, B); 1 (independent) .. 2.

    A modality-independent similarity (CT or PET against MRI): the joint histogram of the two
    images over all pixels, `bins` equal bins over each image's own range. Less sensitive than
    plain mutual information to how much of the images overlaps. 1.0 when either is constant.
    """
    x, y = as_grey_images(a=a, b=b)
    joint, _, _ = np.histogram2d(x.ravel(), y.ravel(), bins=bins)
    p = joint / max(joint.sum(), 1.0)

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    h_joint = entropy(p)
    return (entropy(p.sum(axis=1)) + entropy(p.sum(axis=0))) / h_joint if h_joint > 0 else 1.0


def ssim_index(a: ArrayLike, b: ArrayLike, *, data_range: float = 255.0) -> float:
    """Mean SSIM (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, 'valid' map.

    `data_range` is L, the span of the grey values: 255 for 0..255 images, 1.0 for bsafuse's
    [0, 1] floats. Needs images of at least 11x11. This is the SSIM that q_ssim sums.
    """
    if not data_range > 0:
        raise InputError(f"data_range must be positive, got {data_range}")
    x, y = as_grey_images(11, a=a, b=b)
    return float(np.mean(ssim_map(x, y, float(data_range))[0]))


def jacobian_determinant(flow: ArrayLike) -> np.ndarray:
    """Determinant of the Jacobian of p -> p + flow(p), by central differences (one-sided at edges).

    Values <= 0 mark folded pixels. Same numbers as bsafuse.warp.jacobian_determinant, in numpy.
    Shapes: (2, H, W) or (N, 2, H, W) -> (N, H, W).
    """
    f = _as_flow(flow, name="flow")
    if min(f.shape[-2:]) < 2:
        raise InputError(f"flow must be at least 2x2 pixels to differentiate, got {np.shape(flow)}")
    dux_dy, dux_dx = np.gradient(f[:, 0], axis=(1, 2))
    duy_dy, duy_dx = np.gradient(f[:, 1], axis=(1, 2))
    return (1 + dux_dx) * (1 + duy_dy) - dux_dy * duy_dx


def folding_percentage(flow: ArrayLike) -> float:
    """Share of pixels, in percent (0..100), whose Jacobian determinant is <= 0 (folded)."""
    return float(np.mean(jacobian_determinant(flow) <= 0) * 100)
