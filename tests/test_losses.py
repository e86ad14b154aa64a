"""losses.py: zero at equality, hand-computed values on tiny inputs, the mu update."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from bsafuse.config import LossWeights
from bsafuse.edges import sobel
from bsafuse.losses import (
    consistency_loss,
    flow_smoothness,
    gradient_loss,
    intensity_loss,
    l1,
    modality_loss,
    smoothness_loss,
    ssim,
    ssim_loss,
    step_endpoint_loss,
    structure_loss,
    total_loss,
    transfer_loss,
    update_mu,
)
from bsafuse.metric_losses import cv_loss, qabf_loss, vif_loss
from bsafuse.metrics.fusion import q_abf, q_cv, q_vif
from bsafuse.model import FusionOutput
from bsafuse.warp import warp


def blobs(generator: torch.Generator, n: int = 2, size: int = 32) -> torch.Tensor:
    """Smooth random images in [0, 1]."""
    coarse = torch.rand(n, 1, 6, 6, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).clamp(0, 1)


# SSIM


def test_ssim_is_one_at_equality(generator: torch.Generator) -> None:
    x = blobs(generator)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    assert ssim_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_ssim_of_constant_images_is_the_luminance_term() -> None:
    a, b = 0.2, 0.6
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # contrast/structure term is c2/c2 = 1
    value = ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_ssim_matches_a_direct_2d_gaussian_window(generator: torch.Generator) -> None:
    x, y = torch.rand(2, 1, 20, 20, generator=generator).unbind(0)
    x, y = x[None], y[None]
    r = torch.arange(11.0) - 5
    g = torch.exp(-(r**2) / (2 * 1.5**2))
    w = torch.outer(g, g) / torch.outer(g, g).sum()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t.double(), w.double()[None, None])

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    ref = ((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean()
    assert ssim(x, y).item() == pytest.approx(ref.item(), abs=1e-5)


def test_ssim_is_fp32_under_autocast(generator: torch.Generator) -> None:
    x = blobs(generator).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ssim(x, x).dtype == torch.float32


def test_ssim_refuses_images_smaller_than_its_window() -> None:
    with pytest.raises(ValueError, match=r"at least 11x11 pixels, got \(8, 8\)"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


# Sobel and the L1 terms


def test_sobel_on_a_4x4_ramp() -> None:
    ramp = torch.arange(4.0).repeat(4, 1)[None, None]  # value = column index
    # interior: (1 + 2 + 1) * (x+1 - (x-1)) = 8; edge columns see a replicated neighbour: 4
    expected = torch.tensor([4.0, 8.0, 8.0, 4.0]).repeat(4, 1)[None, None]
    assert torch.equal(sobel(ramp), expected)
    assert torch.equal(sobel(ramp.transpose(-1, -2)), expected.transpose(-1, -2))
    assert sobel(torch.full((1, 1, 4, 4), 0.7)).abs().max().item() < 1e-6


def test_intensity_loss_by_hand() -> None:
    fused = torch.full((1, 1, 1, 2), 0.5)
    warped = torch.tensor([0.2, 0.8]).view(1, 1, 1, 2)
    fixed = torch.full((1, 1, 1, 2), 0.6)
    # max(W(A), B) = [0.6, 0.8] -> |0.5 - 0.6|, |0.5 - 0.8| -> mean 0.2
    assert intensity_loss(fused, warped, fixed).item() == pytest.approx(0.2)
    assert l1(warped, fixed).item() == pytest.approx((0.4 + 0.2) / 2)


def test_gradient_loss_by_hand() -> None:
    ramp = torch.arange(4.0).repeat(4, 1)[None, None] / 4
    flat = torch.zeros(1, 1, 4, 4)
    # target max(|grad ramp|, 0) = |grad ramp| (mean 6/4 = 1.5); a flat fused image misses all of it
    assert gradient_loss(flat, ramp, flat).item() == pytest.approx(1.5)
    assert gradient_loss(ramp, ramp, flat).item() == 0.0
    assert gradient_loss(ramp, flat, ramp).item() == 0.0


def test_structure_loss_is_zero_when_all_agree(generator: torch.Generator) -> None:
    x = blobs(generator)
    loss, s_moving, s_fixed = structure_loss(x, x, x, mu=2.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(s_moving, torch.ones(2)) and torch.allclose(s_fixed, torch.ones(2))


# flows


def test_smoothness_of_a_linear_ramp_flow() -> None:
    flow = torch.zeros(1, 2, 5, 7)
    flow[:, 0] = 0.3 * torch.arange(7.0)  # d/dx = 0.3, d/dy = 0
    flow[:, 1] = -0.5 * torch.arange(5.0)[:, None]  # d/dy = -0.5
    # x differences: channel 0 all 0.09, channel 1 all 0; y: channel 0 0, channel 1 0.25
    expected = ((0.09 + 0.0) / 2 + (0.0 + 0.25) / 2) / 2
    assert flow_smoothness(flow).item() == pytest.approx(expected)
    assert flow_smoothness(torch.full((2, 2, 4, 4), 3.0)).item() == 0.0  # a translation is smooth


def test_smoothness_loss_weighs_every_step_of_both_directions() -> None:
    steps = [torch.zeros(1, 2, 2**i, 2**i) for i in range(2, 7)]
    ramp = torch.zeros(1, 2, 64, 64)
    ramp[:, 0] = torch.arange(64.0)  # squared x differences: 1 and 0 -> smoothness (0.5 + 0) / 2
    weights = LossWeights(smooth_steps=(1.0, 2.0, 3.0, 4.0, 5.0), smooth_total=0.0)
    assert smoothness_loss(steps, steps, torch.zeros(1, 2, 64, 64), weights).item() == 0.0
    # the finest step on the fixed side alone is regularised too (the public code misses it)
    assert smoothness_loss(steps, [*steps[:4], ramp], ramp, weights).item() == pytest.approx(5 * 0.25)
    with_total = LossWeights(smooth_steps=(0.0,) * 5, smooth_total=2.0)
    assert smoothness_loss(steps, steps, ramp, with_total).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"smooth_steps has 5 weights but the model gave 4 \+ 4"):
        smoothness_loss(steps[:4], steps[:4], ramp, weights)


def test_consistency_prefers_the_true_flow(generator: torch.Generator) -> None:
    label = blobs(generator, n=1, size=48)
    t = torch.tensor([3.0, -2.0]).view(1, 2, 1, 1).expand(1, 2, 48, 48)
    moving = warp(label, -t)  # label moved by t: the registration flow is t
    assert consistency_loss(label, label).item() == pytest.approx(0.0, abs=1e-6)
    true = consistency_loss(label, warp(moving, t))
    zero = consistency_loss(label, warp(moving, torch.zeros_like(t)))
    assert true.item() < 0.5 * zero.item()


# modality cross-entropies


def test_modality_loss_by_hand() -> None:
    zeros = torch.zeros(3, 2)
    assert modality_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2))
    right_a = torch.tensor([[0.0, 20.0]])  # A is class 1 (Eq. 1: CE(y_A, [0, 1]))
    right_b = torch.tensor([[20.0, 0.0]])  # B is class 0
    assert modality_loss(right_a, right_b).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.tensor([[1.0, 2.0]])
    expected = -math.log(math.exp(2) / (math.exp(1) + math.exp(2)))
    assert modality_loss(logits, right_b).item() == pytest.approx(expected, abs=1e-6)


def test_transfer_loss_is_minimal_at_uncertainty() -> None:
    even = torch.full((2, 2), 3.0)
    assert transfer_loss(even, even).item() == pytest.approx(2 * math.log(2))
    sure = torch.tensor([[0.0, 4.0], [4.0, 0.0]])
    assert transfer_loss(sure, even).item() > 2 * math.log(2) + 0.5


# total loss and mu


def fake_output(fused: torch.Tensor, warped: torch.Tensor) -> FusionOutput:
    n, _, h, w = fused.shape
    steps = tuple(torch.zeros(n, 2, h >> k, w >> k) for k in range(4, -1, -1))
    logits = torch.zeros(n, 2)
    return FusionOutput(
        fused=fused,
        flow=torch.zeros(n, 2, h, w),
        warped=warped,
        valid=torch.ones(n, 1, h, w),
        flows_moving=steps,
        flows_fixed=steps,
        logits_moving=logits,
        logits_fixed=logits,
        logits_moving_transfer=logits,
        logits_fixed_transfer=logits,
    )


def test_total_loss_is_the_weighted_sum_of_its_terms(generator: torch.Generator) -> None:
    a, b = blobs(generator), blobs(generator)
    fused = ((a + b) / 2).requires_grad_()
    weights = LossWeights(grad=2.0)
    loss, terms = total_loss(fake_output(fused, a), moving=a, fixed=b, label=a, mu=0.7, weights=weights)
    expected = (
        terms["ce1"]
        + terms["ce2"]
        + terms["consis"]
        + terms["smooth"]
        + terms["struct"]
        + 2.0 * terms["grad"]
        + 0.5 * terms["inten"]
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["total"].item() == pytest.approx(loss.item())
    assert terms["ce1"].item() == pytest.approx(2 * math.log(2), rel=1e-6)
    assert terms["consis"].item() == pytest.approx(0.0, abs=1e-6)  # warped == label
    assert terms["ssim_fused_moving"].item() == pytest.approx(ssim(fused, a).sum().item())
    assert terms["ssim_fused_fixed"].item() == pytest.approx(ssim(fused, b).sum().item())
    assert all(not t.requires_grad for t in terms.values())
    loss.backward()
    assert fused.grad is not None and fused.grad.abs().sum() > 0


def test_label_target_judges_the_fusion_against_the_aligned_truth(generator: torch.Generator) -> None:
    a, b, shifted = blobs(generator), blobs(generator), blobs(generator)  # `shifted`: a poor registration
    fused = (a + b) / 2
    _, paper = total_loss(fake_output(fused, shifted), moving=a, fixed=b, label=a)
    _, truth = total_loss(fake_output(fused, shifted), moving=a, fixed=b, label=a, weights=LossWeights(label_target=1.0))
    _, aligned = total_loss(fake_output(fused, a), moving=a, fixed=b, label=a)  # as if perfectly registered
    for name in ("struct", "inten", "grad", "ssim_fused_moving"):
        assert truth[name].item() == pytest.approx(aligned[name].item(), rel=1e-6), name
        assert truth[name].item() != pytest.approx(paper[name].item(), rel=1e-3), name
    assert truth["consis"].item() == pytest.approx(paper["consis"].item())  # registration terms unchanged
    _, half = total_loss(fake_output(fused, shifted), moving=a, fixed=b, label=a, weights=LossWeights(label_target=0.5))
    mid = total_loss(fake_output(fused, (a + shifted) / 2), moving=a, fixed=b, label=a)[1]
    assert half["inten"].item() == pytest.approx(mid["inten"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="share in"):
        LossWeights(label_target=1.5)


def test_update_mu_is_the_ssim_ratio_clipped() -> None:
    assert update_mu(3.0, 4.0) == pytest.approx(0.75)
    assert update_mu(torch.tensor(8.0), torch.tensor(4.0)) == pytest.approx(2.0)
    assert update_mu(100.0, 1.0) == 10.0
    assert update_mu(1.0, 0.0) == 1.0


def test_flow_term_is_the_mean_end_point_error_and_off_by_default(generator: torch.Generator) -> None:
    a, b = blobs(generator), blobs(generator)
    out = fake_output((a + b) / 2, a)  # its flow is zero everywhere
    truth = torch.zeros_like(out.flow)
    truth[:, 0], truth[:, 1] = 3.0, 4.0  # |(3, 4)| = 5 pixels at every pixel
    _, paper = total_loss(out, moving=a, fixed=b, label=a, flow_true=truth)
    assert "flow" not in paper  # the paper's recipe has no supervised flow term
    loss, terms = total_loss(out, moving=a, fixed=b, label=a, weights=LossWeights(flow=2.0), flow_true=truth)
    assert terms["flow"].item() == pytest.approx(5.0)
    assert loss.item() == pytest.approx(paper["total"].item() + 10.0, rel=1e-6)
    with pytest.raises(ValueError, match="needs flow_true"):
        total_loss(out, moving=a, fixed=b, label=a, weights=LossWeights(flow=1.0))


# Q_CV as a loss (not in the paper)


def grey_levels(generator: torch.Generator, height: int = 48, width: int = 48) -> torch.Tensor:
    """A (1, 1, height, width) image of whole grey levels 0..255, black 2-pixel border, both extremes present.

    The border makes replicated and zero-padded Sobel edges agree; whole levels from 0 to 255 make
    q_cv's stretch-and-round the identity, so cv_loss * 255^2 must equal q_cv.
    """
    image = torch.zeros(1, 1, height, width)
    inside = blobs(generator, n=1, size=max(height, width))[..., : height - 4, : width - 4]
    image[..., 2:-2, 2:-2] = torch.round(inside * 255)
    image[..., 5, 5], image[..., 6, 6] = 0.0, 255.0
    return image


def test_cv_loss_is_q_cv_in_unit_grey_levels(generator: torch.Generator) -> None:
    f, a, b = (grey_levels(generator) for _ in range(3))  # 48 px: three blocks of 16 per side
    expected = q_cv(f[0, 0].numpy(), a[0, 0].numpy(), b[0, 0].numpy())
    got = cv_loss(f / 255, a / 255, b / 255).item() * 255**2
    assert expected > 100  # unrelated images: a large distortion
    assert got == pytest.approx(expected, rel=1e-4)
    # a size that is not a multiple of 16: zero-padded last blocks, as the metric
    f, a, b = (grey_levels(generator, 40, 44) for _ in range(3))
    expected = q_cv(f[0, 0].numpy(), a[0, 0].numpy(), b[0, 0].numpy())
    assert cv_loss(f / 255, a / 255, b / 255).item() * 255**2 == pytest.approx(expected, rel=1e-4)


def test_cv_loss_is_zero_on_the_only_salient_source_and_its_gradient_descends(
    generator: torch.Generator,
) -> None:
    a, flat = blobs(generator), torch.full((2, 1, 32, 32), 0.3)  # the flat source has no saliency
    assert cv_loss(a, a, flat).item() == pytest.approx(0.0, abs=1e-9)
    fused = ((a + blobs(generator)) / 2).requires_grad_()  # another image's structure in it
    before = cv_loss(fused, a, flat)
    before.backward()
    assert fused.grad is not None
    after = cv_loss(fused.detach() - 0.5 * fused.grad / fused.grad.abs().max(), a, flat)
    assert 0 < after.item() < before.item()


@pytest.mark.parametrize(("name", "term"), [("cv", cv_loss), ("abf", qabf_loss), ("vif", vif_loss)])
def test_fusion_metric_term_joins_the_total_only_with_its_weight(
    generator: torch.Generator, name: str, term: Callable[..., torch.Tensor]
) -> None:
    a, b = blobs(generator, size=48), blobs(generator, size=48)  # Q_VIF needs 41 x 41
    out = fake_output((a + b) / 2, a)
    _, paper = total_loss(out, moving=a, fixed=b, label=a)
    assert name not in paper
    loss, terms = total_loss(out, moving=a, fixed=b, label=a, weights=LossWeights(**{name: 3.0}))
    assert terms[name].item() == pytest.approx(term((a + b) / 2, a, b).item())
    assert loss.item() == pytest.approx(paper["total"].item() + 3.0 * terms[name].item(), rel=1e-6)


# Q_AB/F as a loss (not in the paper)


def test_qabf_loss_is_one_minus_q_abf(generator: torch.Generator) -> None:
    for height, width in ((48, 48), (40, 44)):
        a, b = grey_levels(generator, height, width) / 255, grey_levels(generator, height, width) / 255
        for fused in ((a + b) / 2, torch.maximum(a, b), grey_levels(generator, height, width) / 255):
            expected = q_abf(fused[0, 0].numpy(), a[0, 0].numpy(), b[0, 0].numpy())
            assert 0.1 < expected < 0.9
            assert 1 - qabf_loss(fused, a, b).item() == pytest.approx(expected, abs=1e-3)


def test_qabf_loss_floor_on_the_only_edged_source_and_its_gradient_descends(
    generator: torch.Generator,
) -> None:
    a, flat = blobs(generator), torch.full((2, 1, 32, 32), 0.3)  # the flat source has no edges to weigh
    # every edge kept exactly: ratio 1, orientations equal; the metric's sigmoids cap Q_AB/F there
    best = 0.9994 / (1 + math.exp(-15 * 0.5)) * 0.9879 / (1 + math.exp(-22 * 0.2))
    assert qabf_loss(a, a, flat).item() == pytest.approx(1 - best, abs=1e-6)
    fused = ((a + blobs(generator)) / 2).requires_grad_()  # another image's edges in it
    before = qabf_loss(fused, a, flat)
    before.backward()
    assert fused.grad is not None and torch.isfinite(fused.grad).all()
    after = qabf_loss(fused.detach() - 0.05 * fused.grad / fused.grad.abs().max(), a, flat)
    assert 1 - best < after.item() < before.item()


# Q_VIF as a loss (not in the paper)


def test_vif_loss_is_one_minus_q_vif(generator: torch.Generator) -> None:
    for height, width in ((48, 48), (45, 52)):
        a, b = grey_levels(generator, height, width) / 255, grey_levels(generator, height, width) / 255
        for fused in ((a + b) / 2, torch.maximum(a, b), grey_levels(generator, height, width) / 255):
            fused = torch.round(fused * 255) / 255  # whole grey levels, as the metric's inputs
            expected = q_vif(*(255 * x[0, 0].double().numpy() for x in (fused, a, b)))
            assert 0.01 < expected < 0.9
            assert 1 - vif_loss(fused, a, b).item() == pytest.approx(expected, abs=1e-4)
    a = grey_levels(generator) / 255
    # F a perfect copy of both (equal) sources: gain 1 and no noise in every window, all kept
    assert 1 - vif_loss(a, a, a).item() == pytest.approx(1.0, abs=1e-5)
    assert 1 - vif_loss(a / 2, a, a).item() < 0.9  # half the contrast: information lost


def test_vif_loss_gradient_keeps_more_of_the_sources(generator: torch.Generator) -> None:
    a, b = blobs(generator, size=48), blobs(generator, size=48)
    fused = (0.2 * (a + b) + 0.3).requires_grad_()  # both sources kept at a fifth of their contrast
    before = vif_loss(fused, a, b)
    before.backward()
    assert fused.grad is not None and torch.isfinite(fused.grad).all()
    after = vif_loss(fused.detach() - 0.05 * fused.grad / fused.grad.abs().max(), a, b)
    assert after.item() < before.item()


# End-point supervision at every BSFA step (not in the paper)


def step_flows(
    shift: tuple[float, float], carried_by: int, sizes: tuple[int, ...] = (4, 8, 16, 32)
) -> list[torch.Tensor]:
    """Step flows (coarse to fine) where step `carried_by` alone moves by `shift` full-size (33 px) pixels."""
    flows = []
    for i, h in enumerate(sizes):
        flow = torch.zeros(1, 2, h, h)
        if i == carried_by:  # the shift in this step's own pixels (align-corners: (h - 1) / (33 - 1))
            flow[:, 0], flow[:, 1] = shift[0] * (h - 1) / 32, shift[1] * (h - 1) / 32
        flows.append(flow)
    return flows


def test_step_endpoint_loss_by_hand() -> None:
    truth = torch.zeros(1, 2, 33, 33)
    truth[:, 0], truth[:, 1] = 3.0, 4.0  # a 5-pixel translation: the same at every scale
    zeros = [torch.zeros_like(f) for f in step_flows((0, 0), 0)]
    # the coarsest step takes it all: every partial sum is right
    assert step_endpoint_loss(step_flows((3.0, 4.0), 0), zeros, truth).item() == pytest.approx(0.0, abs=1e-5)
    # only the finest step moves: three of the four partial sums are 5 px short
    assert step_endpoint_loss(step_flows((3.0, 4.0), 3), zeros, truth).item() == pytest.approx(
        3 / 4 * 5, rel=1e-5
    )
    # phi = phi_A - phi_B: the fixed side moving by -t/2 and the moving one by t/2 at step 1
    half = step_flows((1.5, 2.0), 1)
    assert step_endpoint_loss(half, [-f for f in half], truth).item() == pytest.approx(1 / 4 * 5, rel=1e-5)


def test_flow_scales_term_needs_the_true_flow(generator: torch.Generator) -> None:
    a, b = blobs(generator), blobs(generator)
    out = fake_output((a + b) / 2, a)
    with pytest.raises(ValueError, match="flow_true"):
        total_loss(out, moving=a, fixed=b, label=a, weights=LossWeights(flow_scales=1.0))
    truth = torch.zeros(2, 2, 32, 32)
    truth[:, 0] = 2.0
    loss, terms = total_loss(
        out, moving=a, fixed=b, label=a, weights=LossWeights(flow_scales=2.0), flow_true=truth
    )
    _, paper = total_loss(out, moving=a, fixed=b, label=a)
    assert terms["flow_scales"].item() == pytest.approx(
        2.0, rel=1e-5
    )  # a still network: 2 px short at every step
    assert loss.item() == pytest.approx(paper["total"].item() + 2.0 * 2.0, rel=1e-6)
