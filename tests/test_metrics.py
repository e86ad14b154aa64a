"""Metrics on hand-checkable cases: identities, constants, symmetry, tiny arrays, errors, flags.

The agreement with the MATLAB originals on real images is in test_metrics_reference.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from bsafuse.metrics import (
    FUSION_METRICS,
    METRICS,
    endpoint_error,
    folding_percentage,
    fusion_metrics,
    jacobian_determinant,
    ncc,
    normalised_mutual_information,
    q_abf,
    q_cv,
    q_s,
    q_ssim,
    q_vif,
    ssim_index,
)
from bsafuse.metrics.fusion import GAMMA_A, GAMMA_G, KAPPA_A, SIGMA_A

C1 = (0.01 * 255) ** 2  # SSIM constants for L = 255
C2 = (0.03 * 255) ** 2


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def smooth_image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A 0..255 integer-valued image with structure at several scales."""
    y, x = np.mgrid[0:size, 0:size] / size
    image = 120 + 80 * np.sin(6 * x + 2 * y) * np.cos(5 * y) + rng.normal(0, 10, (size, size))
    return np.clip(np.round(image), 0, 255)


# --- fusion metrics ---------------------------------------------------------------------------


def test_identical_images_score_perfectly(rng: np.random.Generator) -> None:
    a = smooth_image(rng)
    assert q_ssim(a, a, a) == pytest.approx(2.0, abs=1e-12)
    assert q_s(a, a, a) == pytest.approx(1.0, abs=1e-12)
    assert q_cv(a, a, a) == 0.0
    assert q_vif(a, a, a) == pytest.approx(1.0, abs=1e-8)


def test_q_abf_of_identical_images_keeps_the_equal_strength_quirk(rng: np.random.Generator) -> None:
    # F = A = B: every edge pixel has g_X == g_F, so the strength "ratio" is g_F itself (>= 255 for
    # integer images times 255), giving the full Gamma_g; orientations agree, so the score is
    # Gamma_g * Gamma_a / (1 + exp(k_a (1 - sigma_a))), not the Gamma_g / (1 + e^-7.5) of ratio 1.
    a = smooth_image(rng)
    expected = GAMMA_G * GAMMA_A / (1 + math.exp(KAPPA_A * (1 - SIGMA_A)))
    assert q_abf(a, a, a) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.975333, abs=1e-6)  # ratio 1 would give 0.974794


def test_black_images_have_no_edges_and_no_saliency() -> None:
    black = np.zeros((48, 48))
    assert math.isnan(q_abf(black, black, black))
    assert math.isnan(q_cv(black, black, black))
    assert q_ssim(black, black, black) == 2.0
    assert q_s(black, black, black) == 1.0
    assert q_vif(black, black, black) == pytest.approx(1.0)  # only the 1e-7 terms are left


def test_constant_images_follow_the_ssim_luminance_term() -> None:
    a = np.full((48, 48), 100.0)
    f = np.full((48, 48), 50.0)
    luminance = (2 * 100 * 50 + C1) / (100**2 + 50**2 + C1)  # contrast-structure term is C2 / C2
    assert q_ssim(f, a, a) == pytest.approx(2 * luminance, rel=1e-10)
    assert q_s(f, a, a) == pytest.approx(luminance, rel=1e-10)
    assert ssim_index(f, a) == pytest.approx(luminance, rel=1e-10)


@pytest.mark.parametrize("metric", [q_abf, q_cv, q_s, q_ssim])
def test_swapping_the_sources_changes_nothing(metric: Callable[..., float], rng: np.random.Generator) -> None:
    a, b = smooth_image(rng), np.clip(smooth_image(rng).T + 20, 0, 255)
    f = np.round((a + b) / 2)
    assert metric(f, a, b) == pytest.approx(metric(f, b, a), rel=1e-12)


def test_q_cv_is_lower_for_the_better_fusion(rng: np.random.Generator) -> None:
    a, b = smooth_image(rng), np.clip(smooth_image(rng).T + 20, 0, 255)
    good = np.round((a + b) / 2)
    bad = np.round(0.9 * a + 0.1 * rng.uniform(0, 255, a.shape))
    assert q_cv(good, a, b) < q_cv(bad, a, b)
    assert q_abf(good, a, b) > q_abf(bad, a, b)


def test_fusion_metrics_returns_the_five_keys_and_agrees_with_the_functions(rng: np.random.Generator) -> None:
    a, b = smooth_image(rng), smooth_image(rng).T
    f = np.round((a + b) / 2)
    result = fusion_metrics(f, a, b)
    assert tuple(result) == FUSION_METRICS
    singles = {"q_abf": q_abf, "q_cv": q_cv, "q_vif": q_vif, "q_s": q_s, "q_ssim": q_ssim}
    assert result == {key: singles[key](f, a, b) for key in FUSION_METRICS}
    assert all(isinstance(v, float) for v in result.values())


def test_uint8_and_float_give_the_same_numbers(rng: np.random.Generator) -> None:
    a, b = smooth_image(rng), smooth_image(rng).T
    f = np.round((a + b) / 2)
    as_uint8 = fusion_metrics(f.astype(np.uint8), a.astype(np.uint8), b.astype(np.uint8))
    assert as_uint8 == fusion_metrics(f, a, b)


def test_colour_input_is_reduced_to_bt601_luma(rng: np.random.Generator) -> None:
    rgb = rng.uniform(0, 255, (48, 48, 3))
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    b = smooth_image(rng, 48)
    f = np.round((luma + b) / 2)
    assert fusion_metrics(f, rgb, b) == pytest.approx(fusion_metrics(f, luma, b), rel=1e-12)


def test_non_square_sizes_that_are_not_multiples_of_16_work(rng: np.random.Generator) -> None:
    a, b = smooth_image(rng, 80)[:50, :70], smooth_image(rng, 80)[5:55, 3:73]
    result = fusion_metrics(np.round((a + b) / 2), a, b)
    assert all(math.isfinite(v) for v in result.values())


def test_different_shapes_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match=r"fused \(64, 64\), moving \(64, 63\), fixed \(64, 64\)"):
        fusion_metrics(np.zeros((64, 64)), np.zeros((64, 63)), np.zeros((64, 64)))


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (
            np.zeros((64, 64, 4)),
            r"moving must be a grey \(H, W\) or colour \(H, W, 3\) image, got shape \(64, 64, 4\)",
        ),
        (np.full((64, 64), np.nan), "moving contains NaN"),
    ],
)
def test_unusable_images_are_refused(image: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        q_ssim(np.zeros((64, 64)), image, np.zeros((64, 64)))


def test_too_small_images_are_refused() -> None:
    small = np.zeros((32, 32))
    with pytest.raises(ValueError, match="at least 41x41"):
        q_vif(small, small, small)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim_index(np.zeros((10, 20)), np.zeros((10, 20)))


def test_metrics_table_has_direction_flags() -> None:
    assert set(FUSION_METRICS) <= set(METRICS)
    lower_is_better = {key for key, info in METRICS.items() if not info.higher_is_better}
    assert lower_is_better == {"q_cv", "epe_mean", "epe_p95", "folding"}
    assert METRICS["q_cv"].arrow == "↓" and METRICS["q_abf"].arrow == "↑"
    assert METRICS["q_abf"].name == "Q_AB/F"


# --- SSIM against a direct 2-D computation ------------------------------------------------------


def test_ssim_of_a_single_window_by_hand() -> None:
    # 11x11 images give a 1x1 map. x = 0, y = 0.01 with L = 1: the luminance term is
    # C1 / (0.01^2 + C1) = 1e-4 / 2e-4 = 0.5 and the contrast-structure term is C2 / C2.
    assert ssim_index(np.zeros((11, 11)), np.full((11, 11), 0.01), data_range=1.0) == pytest.approx(0.5)


def test_ssim_matches_a_direct_windowed_sum(rng: np.random.Generator) -> None:
    x, y = rng.uniform(0, 255, (13, 14)), rng.uniform(0, 255, (13, 14))
    offsets = np.arange(11) - 5
    window = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
    window /= window.sum()
    values = []
    for i in range(3):
        for j in range(4):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = np.sum(window * px), np.sum(window * py)
            vx, vy = np.sum(window * (px - mx) ** 2), np.sum(window * (py - my) ** 2)
            cxy = np.sum(window * (px - mx) * (py - my))
            values.append((2 * mx * my + C1) * (2 * cxy + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2)))
    assert ssim_index(x, y) == pytest.approx(np.mean(values), rel=1e-10)


# --- registration metrics -----------------------------------------------------------------------


def test_ncc_by_hand() -> None:
    a = np.array([[1.0, 2.0, 3.0]])
    assert ncc(a, np.array([[1.0, 3.0, 2.0]])) == pytest.approx(0.5)  # (1) / sqrt(2 * 2)
    assert ncc(a, 2 * a + 7) == pytest.approx(1.0)
    assert ncc(a, -a) == pytest.approx(-1.0)
    assert math.isnan(ncc(a, np.ones((1, 3))))


def test_normalised_mutual_information_by_hand() -> None:
    a = np.array([[0.0, 0.0], [1.0, 1.0]])
    # b determines a (a relabelling, as across modalities): H(A) = H(B) = H(A, B) = ln 2 -> 2
    assert normalised_mutual_information(a, 1 - a) == pytest.approx(2.0)
    # independent halves: H(A) = H(B) = ln 2, H(A, B) = ln 4 -> 1
    assert normalised_mutual_information(a, a.T) == pytest.approx(1.0)
    # three of four pixels agree: H(A) = ln 2, H(B) = H(3/4, 1/4), H(A, B) = H(1/2, 1/4, 1/4)
    b = np.array([[0.0, 1.0], [1.0, 1.0]])
    h = lambda *p: -sum(q * math.log(q) for q in p)  # noqa: E731
    expected = (h(0.5, 0.5) + h(0.25, 0.75)) / h(0.5, 0.25, 0.25)
    assert normalised_mutual_information(a, b, bins=2) == pytest.approx(expected)
    assert normalised_mutual_information(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_ncc_with_a_mask_ignores_the_rest() -> None:
    a = np.array([[1.0, 2.0, 3.0, 100.0]])
    b = np.array([[2.0, 4.0, 6.0, -50.0]])
    assert ncc(a, b, mask=np.array([[1, 1, 1, 0]])) == pytest.approx(1.0)


def test_endpoint_error_by_hand() -> None:
    flow_true = np.zeros((2, 4, 5))
    flow = np.stack([np.full((4, 5), 3.0), np.full((4, 5), 4.0)])
    assert endpoint_error(flow, flow_true) == {"mean": 5.0, "p95": 5.0}
    ramp = np.zeros((1, 2, 4, 5))
    ramp[0, 0] = np.arange(20.0).reshape(4, 5)  # errors 0..19
    result = endpoint_error(ramp, np.zeros_like(ramp))
    assert result["mean"] == pytest.approx(9.5)
    assert result["p95"] == pytest.approx(18.05)  # 0.95 * 19, linear interpolation
    masked = endpoint_error(ramp, np.zeros_like(ramp), mask=np.arange(20).reshape(4, 5) < 4)
    assert masked["mean"] == pytest.approx(1.5)


def test_endpoint_error_refuses_channels_last_and_mismatched_flows() -> None:
    with pytest.raises(ValueError, match=r"\(2, H, W\) or \(N, 2, H, W\), got \(4, 5, 2\)"):
        endpoint_error(np.zeros((4, 5, 2)), np.zeros((4, 5, 2)))
    with pytest.raises(ValueError, match="same shape"):
        endpoint_error(np.zeros((2, 4, 5)), np.zeros((2, 4, 6)))


def test_folding_by_hand() -> None:
    assert folding_percentage(np.zeros((2, 8, 8))) == 0.0
    flow = np.zeros((2, 4, 5))
    flow[0] = [0.0, 0.0, -3.0, -3.0, -3.0]  # x-displacement along each row
    # central differences of u_x: 0, -1.5, -1.5, 0, 0 -> det 1, -0.5, -0.5, 1, 1: 2 of 5 columns fold
    np.testing.assert_allclose(jacobian_determinant(flow)[0, 0], [1, -0.5, -0.5, 1, 1])
    assert folding_percentage(flow) == pytest.approx(40.0)
    squash = np.zeros((2, 6, 6))
    squash[0] = -np.arange(6.0)  # p -> p + u collapses every row to a point: det 0 counts as folded
    assert folding_percentage(squash) == 100.0


def test_jacobian_matches_the_torch_version_in_warp() -> None:
    from bsafuse.warp import jacobian_determinant as torch_jacobian

    flow = torch.randn(2, 2, 9, 11, generator=torch.Generator().manual_seed(0)) * 2
    expected = torch_jacobian(flow).double().numpy()
    np.testing.assert_allclose(jacobian_determinant(flow.numpy()), expected, rtol=1e-5, atol=1e-5)
