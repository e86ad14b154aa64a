"""Image-quality metrics: the paper's five fusion metrics and the registration metrics.

Fusion metrics take ``(fused, moving, fixed)`` = (F, A, B) holding 0..255 grey values (uint8 or
float, (H, W); an (H, W, 3) RGB array is first reduced to its BT.601 full-range luma Y) and
reproduce the fusion literature's MATLAB code in float64 (see ``fusion.py``). Registration
metrics (``registration.py``) compare flows and images. Pure numpy; no I/O, no torch.

>>> import numpy as np
>>> a = np.tile(np.arange(64.0) * 4, (64, 1))
>>> round(fusion_metrics(a, a, a)["q_ssim"], 6)
2.0
"""

from __future__ import annotations

from dataclasses import dataclass

from numpy.typing import ArrayLike

from bsafuse.metrics._filters import as_grey_images
from bsafuse.metrics.fusion import q_abf, q_cv, q_s, q_ssim, q_vif
from bsafuse.metrics.registration import (
    endpoint_error,
    folding_percentage,
    jacobian_determinant,
    ncc,
    normalised_mutual_information,
    ssim_index,
)

__all__ = [
    "FUSION_METRICS",
    "METRICS",
    "MetricInfo",
    "endpoint_error",
    "folding_percentage",
    "fusion_metrics",
    "jacobian_determinant",
    "ncc",
    "normalised_mutual_information",
    "q_abf",
    "q_cv",
    "q_s",
    "q_ssim",
    "q_vif",
    "ssim_index",
]


@dataclass(frozen=True)
class MetricInfo:
    """How to show one metric in a report."""

    name: str  # display name, e.g. "Q_AB/F"
    higher_is_better: bool
    description: str

    @property
    def arrow(self) -> str:
        """The arrow a report prints: "↑" when higher is better, "↓" when lower is better."""
        return "↑" if self.higher_is_better else "↓"


METRICS: dict[str, MetricInfo] = {
    "q_abf": MetricInfo(
        "Q_AB/F", True, "edge strength and orientation of A and B kept in F (Xydeas-Petrovic)"
    ),
    "q_cv": MetricInfo("Q_CV", False, "saliency-weighted perceptual distortion of F (Chen-Varshney)"),
    "q_vif": MetricInfo("Q_VIF", True, "visual information fidelity of F to A and B (Han et al., VIFF)"),
    "q_s": MetricInfo("Q_S", True, "saliency-weighted SSIM of F to A and B (Piella, Liu's form)"),
    "q_ssim": MetricInfo("Q_SSIM", True, "SSIM(F, A) + SSIM(F, B), 0..2 (Wang et al.)"),
    "epe_mean": MetricInfo("EPE mean (px)", False, "mean end-point error of the flow against the true one"),
    "epe_p95": MetricInfo("EPE p95 (px)", False, "95th percentile of the end-point error"),
    "ncc": MetricInfo("NCC", True, "normalised cross-correlation of warped moving and aligned label"),
    "ssim": MetricInfo("SSIM", True, "mean SSIM of warped moving and aligned label"),
    "folding": MetricInfo("Folding (%)", False, "share of pixels whose Jacobian determinant is <= 0"),
}

FUSION_METRICS = ("q_abf", "q_cv", "q_vif", "q_s", "q_ssim")  # the keys fusion_metrics returns


def fusion_metrics(fused: ArrayLike, moving: ArrayLike, fixed: ArrayLike) -> dict[str, float]:
    """All five fusion metrics of F = `fused` against A = `moving` and B = `fixed`.

    Returns {"q_abf", "q_cv", "q_vif", "q_s", "q_ssim"} -> float; see METRICS for the direction
    (Q_CV: lower is better). Images: 0..255 grey values, same (H, W), at least 41x41.
    """
    f, a, b = as_grey_images(41, fused=fused, moving=moving, fixed=fixed)
    functions = {"q_abf": q_abf, "q_cv": q_cv, "q_vif": q_vif, "q_s": q_s, "q_ssim": q_ssim}
    return {key: functions[key](f, a, b) for key in FUSION_METRICS}
