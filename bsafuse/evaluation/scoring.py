"""The scoring convention of `bsafuse evaluate`, in one place (numpy only, no torch).

Fusion metrics are computed as the paper computes them (design.md §6; tests/data/metrics-reference): F is
compared with A = the ground-truth-aligned moving image (the label) and B = the fixed MRI, on 8-bit
grey images: values in [0, 1] are mapped to 0..255 and rounded half up, as saving them to an 8-bit
PNG does, and a colour image is first reduced to its BT.601 full-range luma Y. So `evaluate` on the
saved PNGs gives the same numbers as the protocol run that produced them.

Registration metrics compare a method's flow (which registers the deformed moving image onto the
fixed one) with the ground-truth flow, and its warped moving image with the label, on 0..255 floats
(not rounded): EPE mean and 95th percentile in pixels over all pixels, NCC, SSIM (Wang, 11x11
Gaussian), and the share of folded pixels (Jacobian determinant <= 0).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bsafuse.errors import InputError
from bsafuse.metrics import (
    FUSION_METRICS,
    endpoint_error,
    folding_percentage,
    fusion_metrics,
    ncc,
    ssim_index,
)

REGISTRATION_METRICS = ("epe_mean", "epe_p95", "ncc", "ssim", "folding")
ROW_METRICS = (*FUSION_METRICS, *REGISTRATION_METRICS)  # the metric columns of results.csv, in order


def grey(pixels: np.ndarray, *, name: str) -> np.ndarray:
    """(H, W) grey or (H, W, 3) RGB in [0, 1] -> (H, W) float64 grey (RGB -> BT.601 luma Y)."""
    from bsafuse.io.color import rgb_to_ycbcr

    array = np.asarray(pixels, dtype=np.float64)
    if array.ndim == 3 and array.shape[-1] == 3:
        return np.asarray(rgb_to_ycbcr(array))[..., 0]
    if array.ndim != 2:
        raise InputError(
            f"{name} has shape {array.shape}; evaluation takes 2-D images (H, W) or (H, W, 3) RGB. "
            "For a volume, pick one slice first (e.g. `bsafuse fuse --slice N`)"
        )
    return array


def to_uint8_levels(pixels: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> float64 holding the 8-bit values 0..255 (rounded half up, as an 8-bit PNG)."""
    return np.floor(np.clip(np.asarray(pixels, dtype=np.float64), 0.0, 1.0) * 255.0 + 0.5)


def fusion_scores(fused: np.ndarray, label: np.ndarray, fixed: np.ndarray) -> dict[str, float]:
    """The five fusion metrics of `fused` against (label, fixed): [0, 1] images, grey or RGB."""
    images = [
        to_uint8_levels(grey(x, name=n)) for x, n in ((fused, "fused"), (label, "label"), (fixed, "fixed"))
    ]
    return fusion_metrics(*images)


def registration_scores(
    *, flow: np.ndarray | None, warped: np.ndarray | None, flow_true: np.ndarray | None, label: np.ndarray
) -> dict[str, float | None]:
    """EPE (when both flows are known), NCC and SSIM (when there is a warped image), folding (flow).

    Metrics that do not apply are None: a method that does not register (the `average` rule) has
    no flow; a pre-deformed test set without flow/ files has no ground-truth flow.
    """
    out: dict[str, float | None] = dict.fromkeys(REGISTRATION_METRICS)
    if flow is not None and flow_true is not None:
        epe = endpoint_error(flow, flow_true)
        out["epe_mean"], out["epe_p95"] = epe["mean"], epe["p95"]
    if warped is not None:
        w, lab = grey(warped, name="warped") * 255.0, grey(label, name="label") * 255.0
        out["ncc"] = ncc(w, lab)
        out["ssim"] = ssim_index(w, lab, data_range=255.0)
    if flow is not None:
        out["folding"] = folding_percentage(flow)
    return out


def score_files(
    fused: str | os.PathLike[str], moving: str | os.PathLike[str], fixed: str | os.PathLike[str]
) -> dict[str, float]:
    """Image mode: the five fusion metrics of the file `fused` against `moving` (A) and `fixed` (B).

    `moving` should be the ground-truth-aligned moving image, as in the paper. Files are read with
    bsafuse.io.read_image (PNG, DICOM, NIfTI slices) and scored as 8-bit grey images; they must
    have the same size. Raises InputError for unreadable files or different sizes.
    """
    from bsafuse.io import read_image

    paths = {"fused": Path(fused), "moving": Path(moving), "fixed": Path(fixed)}
    images = {role: grey(read_image(path).pixels, name=str(path)) for role, path in paths.items()}
    shapes = {role: image.shape for role, image in images.items()}
    if len(set(shapes.values())) != 1:
        listed = ", ".join(f"{role} {paths[role].name} is {s[0]}x{s[1]}" for role, s in shapes.items())
        raise InputError(
            f"the three images must have the same size ({listed}); fuse in the fixed image's grid"
        )
    return fusion_scores(images["fused"], images["moving"], images["fixed"])
