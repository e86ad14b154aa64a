"""Fusion metrics as training terms (not in the paper; design.md §3): Q_CV, Q_AB/F and Q_VIF on tensors.

Each is the metric of bsafuse.metrics.fusion computed with differentiable tensor operations on
(N, 1, H, W) images in [0, 1], so that `losses.total_loss` can add it (`LossWeights.cv`,
`LossWeights.abf`, `LossWeights.vif`, all 0 by default). Float32 throughout, also under autocast.
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
from bsafuse.metrics._filters import gaussian_taps
from bsafuse.metrics.fusion import (
    CV_ALPHA,
    CV_BLOCK,
    GAMMA_A,
    GAMMA_G,
    KAPPA_A,
    KAPPA_G,
    SIGMA_A,
    SIGMA_G,
    VIF_EPS,
    VIF_NOISE,
    VIF_SCALE_WEIGHTS,
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


def vif_loss(fused: Tensor, warped: Tensor, fixed: Tensor) -> Tensor:
    """1 - Q_VIF (Han, Cai, Cao & Xu 2013; metrics.fusion.q_vif) as a loss.

    Not in the paper. The metric's steps on tensors, on 0-255 values: four scales of Gaussian
    windows 17/9/5/3 with 'valid' filtering and decimation by 2; per window the gain and the noise
    of F as a distorted copy of each source, with Sheikh & Bovik's fix-ups; per pixel the source
    with the smaller gain; per sample the scales' weighted ratios of kept to available
    information, then 1 - the batch mean. The metric's rounding to grey levels is left out: on
    whole grey levels it equals 1 - q_vif (tested). Images of at least 41 x 41 pixels.
    """
    check_same_size(warped, fixed, names=("warped", "fixed"))
    with fp32_scope(fused.device):
        images = [255 * x.float() for x in (fused, warped, fixed)]
        total = images[0].new_zeros(images[0].shape[0])
        for scale in range(1, 5):
            size = 2 ** (5 - scale) + 1
            taps = torch.from_numpy(gaussian_taps(size, size / 5)).float().to(fused.device)
            if scale > 1:
                images = [_filter_valid(x, taps)[..., ::2, ::2] for x in images]
            if VIF_SCALE_WEIGHTS[scale - 1]:  # scale 2 does not count: its ratio is not computed
                total = total + VIF_SCALE_WEIGHTS[scale - 1] * _vif_ratio(*images, taps=taps)
        return 1 - (total / sum(VIF_SCALE_WEIGHTS)).mean()


def _filter_valid(x: Tensor, taps: Tensor) -> Tensor:
    """Separable 'valid' correlation of (N, C, H, W) maps with outer(taps, taps), per channel."""
    c, n = x.shape[1], taps.numel()
    x = F.conv2d(x, taps.view(1, 1, n, 1).expand(c, 1, n, 1), groups=c)
    return F.conv2d(x, taps.view(1, 1, 1, n).expand(c, 1, 1, n), groups=c)


def _vif_ratio(f: Tensor, a: Tensor, b: Tensor, *, taps: Tensor) -> Tensor:
    """One scale of VIFF per sample: sum(VID + 1e-7) / sum(VIND + 1e-7) over the 'valid' map, (N,)."""
    mu_f, ff = _filter_valid(torch.cat((f, f * f), dim=1), taps).unbind(1)
    var_f = (ff - mu_f * mu_f).clamp_min(0)
    info = []
    for source in (a, b):
        mu, moment, cross = _filter_valid(
            torch.cat((source, source * source, source * f), dim=1), taps
        ).unbind(1)
        var = (moment - mu * mu).clamp_min(0)
        cov = cross - mu * mu_f
        gain = cov / (var + VIF_EPS)
        noise = var_f - gain * cov
        # Sheikh & Bovik's fix-ups, in the metric's order
        flat = var < VIF_EPS
        gain, noise = torch.where(flat, 0.0, gain), torch.where(flat, var_f, noise)
        flat_f = var_f < VIF_EPS
        gain, noise = torch.where(flat_f, 0.0, gain), torch.where(flat_f, 0.0, noise)
        negative = gain < 0
        gain, noise = torch.where(negative, 0.0, gain), torch.where(negative, var_f, noise)
        noise = noise.clamp_min(VIF_EPS)
        vid = torch.log10(1 + gain * gain * var / (noise + VIF_NOISE))
        vind = torch.log10(1 + var / VIF_NOISE)
        info.append((gain, vid, vind))
    (gain_a, vid_a, vind_a), (gain_b, vid_b, vind_b) = info
    use_a = gain_a < gain_b  # the less faithful source speaks; ties go to B
    vid = torch.where(use_a, vid_a, vid_b)
    vind = torch.where(use_a, vind_a, vind_b)
    return (vid + 1e-7).sum(dim=(1, 2)) / (vind + 1e-7).sum(dim=(1, 2))
