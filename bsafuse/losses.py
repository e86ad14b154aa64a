"""Losses of BSAFusion (paper Eqs. 1, 3, 8, 9, 11-14; design.md §3).

A = moving, B = fixed. Pure tensor functions, no state. SSIM, the smoothness terms and every
loss reduction run in float32, also under autocast. Images are (N, 1, H, W) in [0, 1].

    L_total = L_ce1 + L_ce2 + L_consis + L_smooth + L_struct + L_grad + lambda * L_inten
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from bsafuse._checks import check_same_size, check_shape
from bsafuse.config import LossWeights
from bsafuse.edges import fp32_scope, sobel
from bsafuse.metric_losses import cv_loss, qabf_loss, vif_loss
from bsafuse.warp import resize_flow

if TYPE_CHECKING:
    from bsafuse.model import FusionOutput

SSIM_WINDOW = 11  # pixels, Gaussian window side (Wang et al. 2004, MONAI)
SSIM_SIGMA = 1.5  # pixels
SSIM_K1, SSIM_K2 = 0.01, 0.03  # stabilisers, for a data range of 1
# The terms of L_total, each weighed by the LossWeights field of its name (total_loss sums them;
# the training log has one column per term, in this order). "flow", "flow_scales", "cv", "abf" and "vif"
# are present when their weights are.
LOSS_TERMS = (
    "ce1",
    "ce2",
    "consis",
    "smooth",
    "struct",
    "inten",
    "grad",
    "flow",
    "flow_scales",
    "cv",
    "abf",
    "vif",
)
SUMMARY_TERMS = ("total", "ssim_fused_moving", "ssim_fused_fixed")  # also returned by total_loss
MODALITY_MOVING, MODALITY_FIXED = 1, 0  # class indices: CE(y_A, [0, 1]), CE(y_B, [1, 0]) (Eq. 1)


@functools.lru_cache(maxsize=8)
def _gaussian(size: int, sigma: float, device: torch.device) -> Tensor:
    """(size,) normalised 1-D Gaussian window."""
    with torch.inference_mode(False):
        x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
        g = torch.exp(-(x**2) / (2 * sigma**2))
        return g / g.sum()


def ssim(x: Tensor, y: Tensor, *, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """Mean SSIM of each sample, Gaussian window, over the 'valid' positions (no padding).

    Shapes: (N, C, H, W) twice -> (N,), float32. Data range 1 (images in [0, 1]); H, W >= window.
    """
    check_same_size(x, y, names=("x", "y"))
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels, got {tuple(x.shape[-2:])}")
    with fp32_scope(x.device):
        x, y = x.float(), y.float()
        c = x.shape[1]
        g = _gaussian(window, sigma, x.device)
        # the five local moments as one separable grouped convolution
        maps = torch.cat((x, y, x * x, y * y, x * y), dim=1)  # (N, 5C, H, W)
        maps = F.conv2d(maps, g.view(1, 1, 1, -1).expand(5 * c, 1, 1, window), groups=5 * c)
        maps = F.conv2d(maps, g.view(1, 1, -1, 1).expand(5 * c, 1, window, 1), groups=5 * c)
        mx, my, sxx, syy, sxy = maps.chunk(5, dim=1)
        vx, vy, cov = sxx - mx * mx, syy - my * my, sxy - mx * my
        c1, c2 = SSIM_K1**2, SSIM_K2**2
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        return s.flatten(1).mean(dim=1)


def ssim_loss(x: Tensor, y: Tensor) -> Tensor:
    """L_ssim = 1 - SSIM, averaged over the batch (scalar, float32)."""
    return (1 - ssim(x, y)).mean()


def l1(x: Tensor, y: Tensor) -> Tensor:
    """Mean absolute difference (scalar, float32)."""
    return (x.float() - y.float()).abs().mean()


def modality_loss(logits_moving: Tensor, logits_fixed: Tensor) -> Tensor:
    """L_ce1 (Eq. 1) = CE(y_A, class 1) + CE(y_B, class 0); logits (N, 2) each."""
    a = torch.full((len(logits_moving),), MODALITY_MOVING, device=logits_moving.device)
    b = torch.full((len(logits_fixed),), MODALITY_FIXED, device=logits_fixed.device)
    return F.cross_entropy(logits_moving.float(), a) + F.cross_entropy(logits_fixed.float(), b)


def transfer_loss(logits_moving: Tensor, logits_fixed: Tensor) -> Tensor:
    """L_ce2 (Eq. 3) = CE(y'_A, [0.5, 0.5]) + CE(y'_B, [0.5, 0.5]); its minimum is 2 ln 2."""
    total = logits_moving.new_zeros((), dtype=torch.float32)
    for logits in (logits_moving, logits_fixed):
        total = total - 0.5 * F.log_softmax(logits.float(), dim=-1).sum(dim=-1).mean()
    return total


def consistency_loss(label: Tensor, warped: Tensor) -> Tensor:
    """L_consis (Eq. 9) = L_ssim(A_label, W(A, phi)) + |A_label - W(A, phi)|_1."""
    return ssim_loss(label, warped) + l1(label, warped)


def flow_smoothness(flow: Tensor) -> Tensor:
    """Mean squared forward difference of a flow along x and along y, averaged (scalar, fp32).

    The authors divide the sum by 3 (a leftover of 3-D VoxelMorph); the 2-D mean is used here and
    the constant lives in `LossWeights`. Shapes: (N, 2, H, W).
    """
    check_shape(flow, "N 2 H W", name="flow")
    with fp32_scope(flow.device):
        flow = flow.float()
        dx = flow[..., :, 1:] - flow[..., :, :-1]
        dy = flow[..., 1:, :] - flow[..., :-1, :]
        return (dx.pow(2).mean() + dy.pow(2).mean()) / 2


def smoothness_loss(
    flows_moving: Sequence[Tensor],
    flows_fixed: Sequence[Tensor],
    flow: Tensor,
    weights: LossWeights,
) -> Tensor:
    """L_smooth (Eq. 8): every step flow of both directions, plus the total flow."""
    if len(weights.smooth_steps) != len(flows_moving) or len(flows_moving) != len(flows_fixed):
        raise ValueError(
            f"LossWeights.smooth_steps has {len(weights.smooth_steps)} weights but the model gave "
            f"{len(flows_moving)} + {len(flows_fixed)} step flows; give one weight per step"
        )
    total = weights.smooth_total * flow_smoothness(flow)
    for w, fa, fb in zip(weights.smooth_steps, flows_moving, flows_fixed, strict=True):
        total = total + w * (flow_smoothness(fa) + flow_smoothness(fb))
    return total


def structure_loss(fused: Tensor, warped: Tensor, fixed: Tensor, mu: float) -> tuple[Tensor, Tensor, Tensor]:
    """L_struct (Eq. 11) = L_ssim(F, W(A)) + mu * L_ssim(F, B); also the per-sample SSIMs (N,)."""
    s_moving = ssim(fused, warped)
    s_fixed = ssim(fused, fixed)
    return (1 - s_moving).mean() + mu * (1 - s_fixed).mean(), s_moving, s_fixed


def intensity_loss(fused: Tensor, warped: Tensor, fixed: Tensor) -> Tensor:
    """L_inten (Eq. 12) = |F - max(W(A), B)|_1."""
    return l1(fused, torch.maximum(warped.float(), fixed.float()))


def gradient_loss(fused: Tensor, warped: Tensor, fixed: Tensor) -> Tensor:
    """L_grad (Eq. 13) = | |grad F| - max(|grad W(A)|, |grad B|) |_1, Sobel gradients."""
    return l1(sobel(fused), torch.maximum(sobel(warped), sobel(fixed)))


def total_loss(
    out: FusionOutput,
    *,
    moving: Tensor,
    fixed: Tensor,
    label: Tensor,
    mu: float = 1.0,
    weights: LossWeights | None = None,
    flow_true: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_total (Eq. 14) and its detached terms.

    `label` is the moving image aligned to the fixed one (known in training, because the
    misalignment is made on the fly). `moving` is accepted for symmetry and checked; the losses
    read its warped version ``out.warped``. Terms: ce1, ce2, consis, smooth, struct, inten, grad,
    total, and ssim_fused_moving / ssim_fused_fixed (batch sums of SSIM, for `update_mu`).
    With ``weights.flow > 0`` and the ground-truth `flow_true` (N, 2, H, W), a supervised
    end-point term ``flow`` joins them (not in the paper; see LossWeights.flow); with
    ``weights.flow_scales > 0``, its counterpart at every BSFA step's scale ``flow_scales``
    (`step_endpoint_loss`); with ``weights.cv > 0``, the Q_CV term ``cv`` (`metric_losses.cv_loss`,
    not in the paper either); with ``weights.abf > 0``, the Q_AB/F term ``abf`` (`metric_losses.qabf_loss`);
    with ``weights.vif > 0``, the Q_VIF term ``vif`` (`metric_losses.vif_loss`).
    ``weights.label_target`` moves the fusion terms' target from ``out.warped`` towards `label`.
    """
    weights = weights or LossWeights()
    if out.logits_moving_transfer is None or out.logits_fixed_transfer is None:
        raise ValueError("L_ce2 needs the transfer logits: run the model with transfer_scores=True")
    check_same_size(moving, fixed, names=("moving", "fixed"))
    check_same_size(label, fixed, names=("label", "fixed"))
    terms: dict[str, Tensor] = {
        "ce1": modality_loss(out.logits_moving, out.logits_fixed),
        "ce2": transfer_loss(out.logits_moving_transfer, out.logits_fixed_transfer),
        "consis": consistency_loss(label, out.warped),
        "smooth": smoothness_loss(out.flows_moving, out.flows_fixed, out.flow, weights),
    }
    # The fusion losses judge the fused image against the aligned inputs; they must not reshape
    # the inputs to fit the fused image. Through W(A, phi) as a target they would: an untrained
    # (flat) fused image pulls the flow toward pushing the moving image out of view, a collapse
    # seen within ten steps. The flow trains on L_consis and L_smooth, and on the fusion losses
    # only through the fused image itself.
    target = out.warped.detach()
    if weights.label_target > 0:  # the aligned truth, constant: no path back into the flow either
        target = torch.lerp(target, label.to(target.dtype), weights.label_target)
    terms["struct"], s_moving, s_fixed = structure_loss(out.fused, target, fixed, mu)
    terms["inten"] = intensity_loss(out.fused, target, fixed)
    terms["grad"] = gradient_loss(out.fused, target, fixed)
    if weights.flow > 0:
        if flow_true is None:
            raise ValueError("LossWeights.flow > 0 needs flow_true, the ground-truth registration flow")
        terms["flow"] = endpoint_loss(out.flow, flow_true)
    if weights.flow_scales > 0:
        if flow_true is None:
            raise ValueError(
                "LossWeights.flow_scales > 0 needs flow_true, the ground-truth registration flow"
            )
        terms["flow_scales"] = step_endpoint_loss(out.flows_moving, out.flows_fixed, flow_true)
    if weights.cv > 0:
        terms["cv"] = cv_loss(out.fused, target, fixed)
    if weights.abf > 0:
        terms["abf"] = qabf_loss(out.fused, target, fixed)
    if weights.vif > 0:
        terms["vif"] = vif_loss(out.fused, target, fixed)
    loss = sum(getattr(weights, name) * terms[name] for name in LOSS_TERMS if name in terms)
    assert isinstance(loss, Tensor)
    terms = {name: value.detach() for name, value in terms.items()}
    terms["total"] = loss.detach()
    terms["ssim_fused_moving"] = s_moving.detach().sum()
    terms["ssim_fused_fixed"] = s_fixed.detach().sum()
    return loss, terms


def endpoint_loss(flow: Tensor, flow_true: Tensor) -> Tensor:
    """Mean end-point error |phi - phi_true| in pixels (fp32). Shapes: (N, 2, H, W) each."""
    check_shape(flow_true, "N 2 H W", name="flow_true")
    check_same_size(flow, flow_true, names=("flow", "flow_true"))
    return torch.linalg.vector_norm(flow.float() - flow_true.float(), dim=1).mean()


def step_endpoint_loss(
    flows_moving: Sequence[Tensor], flows_fixed: Sequence[Tensor], flow_true: Tensor
) -> Tensor:
    """End-point error of the flow after each BSFA step against the true flow at its scale, averaged.

    After step i the registration so far is Eq. 7's sum over steps 0..i of phi_A^j - phi_B^j;
    its target is `flow_true` brought down to step i's grid (antialiased: the mean displacement
    each coarse pixel covers). Both are compared at full size, in full-size pixels, so every step
    weighs the same and the finest step's target is `flow_true` itself. Not in the paper.
    """
    from bsafuse.model.align import total_flow  # the model's own Eq. 7 (bsafuse.model loads lazily)

    check_shape(flow_true, "N 2 H W", name="flow_true")
    if not flows_moving or len(flows_moving) != len(flows_fixed):
        raise ValueError(
            f"need one fixed step flow per moving one, got {len(flows_moving)} and {len(flows_fixed)}"
        )
    size = (flow_true.shape[-2], flow_true.shape[-1])
    steps = [a - b for a, b in zip(flows_moving, flows_fixed, strict=True)]
    with fp32_scope(flow_true.device):
        errors = []
        for i, step in enumerate(steps):
            coarse = resize_flow(flow_true.float(), (step.shape[-2], step.shape[-1]), antialias=True)
            target = resize_flow(coarse, size)
            errors.append(endpoint_loss(total_flow(steps[: i + 1], size), target))
        return torch.stack(errors).mean()


def update_mu(
    sum_ssim_fused_fixed: float | Tensor,
    sum_ssim_fused_moving: float | Tensor,
    *,
    bounds: tuple[float, float] = (0.1, 10.0),
) -> float:
    """mu for the next epoch = sum_n SSIM(F_n, B_n) / sum_n SSIM(F_n, W(A_n)) (design.md §3).

    Clipped to `bounds`, so one degenerate epoch (an SSIM sum near zero or negative) cannot blow
    up the next epoch's loss; a non-finite ratio gives 1.
    """
    num, den = float(sum_ssim_fused_fixed), float(sum_ssim_fused_moving)
    ratio = num / den if den > 0 else math.inf
    if not math.isfinite(ratio):
        return 1.0
    return min(max(ratio, bounds[0]), bounds[1])
