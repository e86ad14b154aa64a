"""The paper's five fusion metrics, reproducing the fusion literature's MATLAB code.

Argument order everywhere: ``metric(fused, moving, fixed)``, i.e. F, A (moving: CT/PET/SPECT),
B (fixed: MRI). Inputs are (H, W) grey arrays holding 0..255 grey values (uint8 or float; the
values are used as they are, never rescaled) or (H, W, 3) RGB arrays, which are converted to
the BT.601 full-range luma Y = 0.299 R + 0.587 G + 0.114 B first (not rounded). bsafuse's own
[0, 1] images must be multiplied by 255 first: Q_VIF's noise variance and SSIM's C1, C2 are
absolute. Every metric runs in float64. Where a metric is undefined (no edges or no saliency
anywhere, e.g. all-black images) it returns NaN; note that the zero padding of the Sobel filters
gives a constant non-zero image edges along its border, as in the originals.

The numbers match the MATLAB originals to ~1e-13 relative on the reference set
(tests/test_metrics_reference.py); tests/data/metrics-reference/README.md lists every convention.
Two quirks of that code are kept on purpose, so results compare with published tables: Q_AB/F's
equal-strength rule and Q_CV's CSF constant 0.144 (see q_abf and CV_CSF_SCALE).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from bsafuse.metrics._filters import as_grey_images, block_sums, filter_valid, gaussian_taps, sobel

# Q_AB/F (Xydeas & Petrovic 2000): sigmoid constants of edge strength (g) and orientation (a)
GAMMA_G, KAPPA_G, SIGMA_G = 0.9994, -15.0, 0.5
GAMMA_A, KAPPA_A, SIGMA_A = 0.9879, -22.0, 0.8

# Q_CV (Chen & Varshney 2007)
CV_BLOCK = 16  # side of the square regions, pixels
CV_ALPHA = 5.0  # exponent of the gradient magnitude in the saliency
# Mannos & Sakrison (1974) print 0.114 cycles/degree scale; the fusion literature's code (Z. Liu's
# metricChen, VIFB's metricsQcv) has 0.144, and every published Q_CV was computed with it.
CV_CSF_SCALE = 0.144

# Q_VIF (Han et al. 2013)
VIF_NOISE = 0.005 * 255**2  # visual noise variance sigma_n^2, in (grey value)^2
VIF_EPS = 1e-10  # the variance floor of Sheikh & Bovik's fix-ups
VIF_SCALE_WEIGHTS = (1.0, 0.0, 0.15, 1.0)  # scale 2 does not count

# SSIM (Wang et al. 2004) as in Wang's ssim_index defaults
SSIM_TAPS = gaussian_taps(11, 1.5)
SSIM_K1, SSIM_K2 = 0.01, 0.03


def q_abf(fused: ArrayLike, moving: ArrayLike, fixed: ArrayLike) -> float:
    """Q_AB/F (Xydeas & Petrovic 2000): edge information of A and B kept in F; 0..1, higher is better.

    As VIFB's ``metricsQabf``: zero-padded Sobel, orientation atan(gy/gx) with y up (pi/2 where gx = 0),
    weights = source edge strengths (L = 1). Two quirks are copied on purpose: the images are
    scaled by 255 first, and where a source's edge strength equals F's exactly the strength
    "ratio" is F's strength itself (so that pixel scores the full Gamma_g).
    """
    f, a, b = as_grey_images(fused=fused, moving=moving, fixed=fixed)
    strength_f, angle_f = _edges(f)
    weighted = total = 0.0
    for source in (a, b):
        strength, angle = _edges(source)
        with np.errstate(divide="ignore", invalid="ignore"):  # only the branch np.where drops divides by 0
            ratio = np.where(
                strength > strength_f,
                strength_f / strength,
                np.where(strength == strength_f, strength_f, strength / strength_f),
            )
        agreement = 1 - np.abs(angle - angle_f) / (math.pi / 2)
        q_strength = GAMMA_G / (1 + np.exp(KAPPA_G * (ratio - SIGMA_G)))
        q_angle = GAMMA_A / (1 + np.exp(KAPPA_A * (agreement - SIGMA_A)))
        weighted += float(np.sum(q_strength * q_angle * strength))
        total += float(np.sum(strength))
    return weighted / total if total > 0 else math.nan


def _edges(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel edge strength and orientation of 255 * image (the x255 is metricsQabf's).

    The orientation takes y pointing up (rows above minus rows below), as MATLAB's ``conv2`` with
    the Sobel kernels gives. The sign matters: negating gy flips every angle except those where
    gx = 0, which are pi/2 either way.
    """
    gx, gy = sobel(image * 255)
    with np.errstate(divide="ignore", invalid="ignore"):
        angle = np.where(gx == 0, math.pi / 2, np.arctan(-gy / gx))
    return np.sqrt(gx * gx + gy * gy), angle


def q_cv(fused: ArrayLike, moving: ArrayLike, fixed: ArrayLike) -> float:
    """Q_CV (Chen & Varshney 2007): saliency-weighted perceptual distortion; >= 0, LOWER is better.

    Each image is min-max stretched to 0..255 and rounded (a constant image becomes 0). Saliency of
    a 16x16 block = sum of |Sobel gradient|^5; distortion = mean squared difference (source - F)
    after Mannos-Sakrison CSF filtering; Q_CV = sum(l_A D_A + l_B D_B) / sum(l_A + l_B). Sizes
    that are not multiples of 16 get zero-padded last blocks (as MATLAB's ``blkproc``).
    """
    f, a, b = (_stretch(x) for x in as_grey_images(fused=fused, moving=moving, fixed=fixed))
    csf = np.fft.ifftshift(mannos_sakrison(f.shape))  # centred grid -> FFT order
    f_spectrum = np.fft.fft2(f)
    weighted = total = 0.0
    for source in (a, b):
        gx, gy = sobel(source)
        saliency = block_sums(np.sqrt(gx * gx + gy * gy) ** CV_ALPHA, CV_BLOCK)
        filtered = np.fft.ifft2((np.fft.fft2(source) - f_spectrum) * csf).real
        distortion = block_sums(filtered**2, CV_BLOCK) / CV_BLOCK**2
        weighted += float(np.sum(saliency * distortion))
        total += float(np.sum(saliency))
    return weighted / total if total > 0 else math.nan


def _stretch(image: np.ndarray) -> np.ndarray:
    """Min-max stretch to 0..255, rounded half up (all values are >= 0)."""
    low, high = image.min(), image.max()
    if high == low:
        return np.zeros_like(image)
    return np.floor((image - low) / (high - low) * 255 + 0.5)


def mannos_sakrison(shape: tuple[int, ...]) -> np.ndarray:
    """Mannos-Sakrison CSF (with the fusion code's 0.144) on a centred grid: ``freqspace`` axes * size / 8.

    For an even size n the axis runs (-n/2 .. n/2 - 1) * 2/n * n/8, i.e. -32 .. 31.75 for 256; an
    odd n gives a symmetric axis. Rows scale by H / 8 and columns by W / 8 (the reference values
    cover square images only).
    """
    v, u = ((np.arange(n) - n // 2) * (2 / n) * (n / 8) for n in shape)  # rows, columns
    r = np.sqrt(u[None, :] ** 2 + v[:, None] ** 2)
    return 2.6 * (0.0192 + CV_CSF_SCALE * r) * np.exp(-((CV_CSF_SCALE * r) ** 1.1))


def q_vif(fused: ArrayLike, moving: ArrayLike, fixed: ArrayLike) -> float:
    """Q_VIF (Han, Cai, Cao & Xu 2013, VIFF): visual information fidelity of F; higher is better.

    As Han's ``VIFF_Public`` on grey input: 4 scales of Gaussian windows 17/9/5/3 (sigma = size/5),
    'valid' filtering, decimation by 2 between scales, Sheikh & Bovik's gain/noise fix-ups, per
    pixel the source with the smaller gain g (ties: B), scale weights [1, 0, 0.15, 1] / 2.15.
    Needs images of at least 41x41; the noise constant assumes 0..255 values.
    """
    images = np.stack(as_grey_images(41, fused=fused, moving=moving, fixed=fixed))  # (3, H, W): F, A, B
    ratios = []
    for scale in range(1, 5):
        size = 2 ** (5 - scale) + 1
        taps = gaussian_taps(size, size / 5)
        if scale > 1:
            images = filter_valid(images, taps)[:, ::2, ::2]
        ratios.append(_vif_ratio(images, taps))
    return float(np.dot(ratios, VIF_SCALE_WEIGHTS) / sum(VIF_SCALE_WEIGHTS))


def _vif_ratio(images: np.ndarray, taps: np.ndarray) -> float:
    """One scale of VIFF: sum(VID + 1e-7) / sum(VIND + 1e-7) over the 'valid' map."""
    f, a, b = images
    mu_f, mu_a, mu_b, ff, aa, bb, af, bf = filter_valid(
        np.stack((f, a, b, f * f, a * a, b * b, a * f, b * f)), taps
    )
    var_f = np.maximum(ff - mu_f * mu_f, 0)
    info = []  # (gain, VID, VIND) of A, then of B
    for mu, moment, cross in ((mu_a, aa, af), (mu_b, bb, bf)):
        var = np.maximum(moment - mu * mu, 0)
        cov = cross - mu * mu_f
        gain = cov / (var + VIF_EPS)
        noise = var_f - gain * cov
        # Sheikh & Bovik's fix-ups, in this order
        flat = var < VIF_EPS
        gain[flat], noise[flat] = 0, var_f[flat]
        flat_f = var_f < VIF_EPS
        gain[flat_f], noise[flat_f] = 0, 0
        negative = gain < 0
        gain[negative], noise[negative] = 0, var_f[negative]
        noise = np.maximum(noise, VIF_EPS)
        vid = np.log10(1 + gain * gain * var / (noise + VIF_NOISE))
        vind = np.log10(1 + var / VIF_NOISE)
        info.append((gain, vid, vind))
    (gain_a, vid_a, vind_a), (gain_b, vid_b, vind_b) = info
    use_a = gain_a < gain_b  # the less faithful source speaks; ties go to B
    vid = np.where(use_a, vid_a, vid_b)
    vind = np.where(use_a, vind_a, vind_b)
    return float(np.sum(vid + 1e-7) / np.sum(vind + 1e-7))


def ssim_map(x: np.ndarray, y: np.ndarray, data_range: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Wang's SSIM map ('valid' 11x11 Gaussian, sigma 1.5) plus the local variances of x and y.

    Shapes: (H, W) -> three (H - 10, W - 10) maps. Variances are E[x^2] - E[x]^2 (population,
    not clipped), as in Wang's ``ssim_index``.
    """
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y, xx, yy, xy = filter_valid(np.stack((x, y, x * x, y * y, x * y)), SSIM_TAPS)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x, var_y, cov = xx - mu_xx, yy - mu_yy, xy - mu_xy
    ssim = (2 * mu_xy + c1) * (2 * cov + c2) / ((mu_xx + mu_yy + c1) * (var_x + var_y + c2))
    return ssim, var_x, var_y


def q_s(fused: ArrayLike, moving: ArrayLike, fixed: ArrayLike) -> float:
    """Q_S (Piella & Heijmans 2003), Z. Liu's SSIM-based form (``metricPeilla``, mode 1); higher is better.

    Q_S = mean over the SSIM map of l * SSIM(F, A) + (1 - l) * SSIM(F, B), with the local saliency
    l = var_A / (var_A + var_B) (0.5 where both variances are 0). Needs images of at least 11x11.

    In windows that are flat in both A and B but not 0, both variances are rounding noise
    (~1e-12) and their ratio is arbitrary, in MATLAB too; l is clipped to [0, 1] so such windows
    still score a mix of the two SSIMs. (Flat *black* windows give exact zeros, hence l = 0.5.)
    """
    f, a, b = as_grey_images(11, fused=fused, moving=moving, fixed=fixed)
    ssim_fa, _, var_a = ssim_map(f, a, 255.0)
    ssim_fb, _, var_b = ssim_map(f, b, 255.0)
    total = var_a + var_b
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.where(total == 0, 0.5, np.clip(var_a / total, 0, 1))
    return float(np.mean(weight * ssim_fa + (1 - weight) * ssim_fb))


def q_ssim(fused: ArrayLike, moving: ArrayLike, fixed: ArrayLike) -> float:
    """Q_SSIM = SSIM(F, A) + SSIM(F, B) (Wang et al. 2004, L = 255); at most 2, higher is better.

    Each term is the plain mean of the 'valid' SSIM map. Needs images of at least 11x11.
    """
    f, a, b = as_grey_images(11, fused=fused, moving=moving, fixed=fixed)
    return float(np.mean(ssim_map(f, a, 255.0)[0]) + np.mean(ssim_map(f, b, 255.0)[0]))
