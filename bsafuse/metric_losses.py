"""Fusion metrics as training terms (not in the paper; design.md §3): Q_CV and Q_AB/F on tensors.

Each is the metric of bsafuse.metrics.fusion computed with differentiable tensor operations on
(N, 1, H, W) images in [0, 1], so that `losses.total_loss` can add it (`LossWeights.cv`,
`LossWeights.abf`, both 0 by default). Float32 throughout, also under autocast.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bsafuse._checks import check_same_size
from bsafuse.edges import fp32_scope, sobel_xy
from bsafuse.metrics.fusion import (
    CV_ALPHA,
    CV_BLOCK,
    GAMMA_A,
    GAMMA_G,
    KAPPA_A,
    KAPPA_G,
    SIGMA_A,
    SIGMA_G,
    mannos_sakrison,
)


@functools.lru_cache(maxsize=8)
def _csf(shape: tuple[int, int], device: torch.device) -> Tensor:
    """Q_CV's Mannos-Sakrison filter for an (H, W) image, in FFT order, float32."""
    return torch.from_numpy(np.fft.ifftshift(mannos_sakrison(shape))).float().to(device)


def _stretch(image: Tensor) -> Tensor:
    """Each sample min-max stretched to [0, 1] (a constant sample becomes 0), as Q_CV's inputs.

    The minimum and maximum are constants to the gradient: the stretch is a per-sample linear map.
    """
    flat = image.detach().flatten(1)
    low, high = flat.amin(dim=1), flat.amax(dim=1)
    span = torch.where(high > low, high - low, torch.ones_like(high))
    shape = (-1,) + (1,) * (image.dim() - 1)
    return torch.where((high > low).view(shape), (image - low.view(shape)) / span.view(shape), 0.0)


def cv_loss(fused: Tensor, warped: Tensor, fixed: Tensor) -> Tensor:
    """Q_CV (Chen & Varshney 2007; metrics.fusion.q_cv) as a loss, in [0, 1] units: q_cv / 255^2.

    Not in the paper. The metric's steps on tensors: each image stretched to [0, 1]; the saliency
    of a 16x16 block is the sum of |Sobel gradient|^5 of a source; its distortion the mean squared
    CSF-filtered difference source - F; per sample, sum(l_A D_A + l_B D_B) / sum(l_A + l_B), then
    the batch mean. The metric's rounding to grey levels is left out and the Sobel edges are
    replicated (`sobel_xy`): on whole grey levels with a black border it equals q_cv (tested), on
    a Harvard CT-MRI pair it is within 1 % (0.4-0.8 %). It rewards, block by block, the contrast
    of whichever source has the stronger edges there.
    """
    check_same_size(warped, fixed, names=("warped", "fixed"))
    with fp32_scope(fused.device):
        f, a, b = (_stretch(x.float()) for x in (fused, warped, fixed))
        height, width = f.shape[-2:]
        pad = (0, -width % CV_BLOCK, 0, -height % CV_BLOCK)  # zero-padded last blocks, as blkproc
        csf = _csf((height, width), f.device)
        f_spectrum = torch.fft.fft2(f)
        weighted = total = f.new_zeros(f.shape[0])
        for source in (a, b):
            with torch.no_grad():
                magnitude = torch.linalg.vector_norm(sobel_xy(source), dim=2)
                saliency = F.avg_pool2d(F.pad(magnitude**CV_ALPHA, pad), CV_BLOCK)
            difference = torch.fft.ifft2((torch.fft.fft2(source) - f_spectrum) * csf).real
            distortion = F.avg_pool2d(F.pad(difference**2, pad), CV_BLOCK)
            weighted = weighted + (saliency * distortion).sum(dim=(1, 2, 3))
            total = total + saliency.sum(dim=(1, 2, 3))
        return (weighted / total.clamp_min(torch.finfo(torch.float32).tiny)).mean()


def _strength_and_angle(image: Tensor) -> tuple[Tensor, Tensor]:
    """Sobel edge strength and orientation atan(-gy / gx) (pi/2 where gx = 0), as Q_AB/F's.

    Shapes: (N, 1, H, W) -> two (N, 1, H, W), float32. The strength's gradient at a flat pixel is 0.
    """
    g = sobel_xy(image)
    gx, gy = g[:, :, 0], g[:, :, 1]
    vertical = gx == 0
    angle = torch.where(vertical, math.pi / 2, torch.atan(-gy / torch.where(vertical, 1.0, gx)))
    return torch.linalg.vector_norm(g, dim=2), angle


def qabf_loss(fused: Tensor, warped: Tensor, fixed: Tensor) -> Tensor:
    """1 - Q_AB/F (Xydeas & Petrovic 2000; metrics.fusion.q_abf) as a loss, in [0, 1].

    Not in the paper. The metric's steps on tensors: per pixel, how much of each source's Sobel
    edge the fused image keeps, in strength (the ratio of the smaller to the larger strength) and
    in orientation, through the metric's two sigmoids; the sources' edge strengths weigh the
    pixels; per sample sum(Q_AF g_A + Q_BF g_B) / sum(g_A + g_B), then 1 - the batch mean. The
    metric is scale-free, so its x255 is left out; its "equal strengths" quirk is left out, and
    the Sobel edges are replicated (`sobel_xy`): on a black-bordered image it is within 1e-3 of
    1 - q_abf (tested).
    """
    check_same_size(warped, fixed, names=("warped", "fixed"))
    with fp32_scope(fused.device):
        strength_f, angle_f = _strength_and_angle(fused.float())
        weighted = total = strength_f.new_zeros(strength_f.shape[0])
        for source in (warped, fixed):
            with torch.no_grad():
                strength, angle = _strength_and_angle(source.float())
            larger = torch.maximum(strength, strength_f).clamp_min(torch.finfo(torch.float32).tiny)
            ratio = torch.minimum(strength, strength_f) / larger
            agreement = 1 - (angle - angle_f).abs() / (math.pi / 2)
            q_strength = GAMMA_G * torch.sigmoid(-KAPPA_G * (ratio - SIGMA_G))
            q_angle = GAMMA_A * torch.sigmoid(-KAPPA_A * (agreement - SIGMA_A))
            weighted = weighted + (q_strength * q_angle * strength).sum(dim=(1, 2, 3))
            total = total + strength.sum(dim=(1, 2, 3))
        return 1 - (weighted / total.clamp_min(torch.finfo(torch.float32).tiny)).mean()
