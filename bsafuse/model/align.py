"""BSFA: bidirectional stepwise feature alignment (paper Eqs. 4-7).

A = moving, B = fixed. K forward registration layers (FRL) move A's features toward a common
middle and K reverse ones (RRL) move B's, coarse to fine: step i works at H / 2**(K-1-i). Each
step predicts a step flow per direction (in pixels of its own scale, at most `max_step` by a
tanh), warps that side's features with it and brings them up x2 (Eq. 6). The total flows are the
sums of all step flows resized to full size (Eq. 7):

    phi_A = sum_i up(phi_A^i),  phi_B = sum_i up(phi_B^i),  phi = phi_A - phi_B

(phi = phi_A - phi_B is Eq. 5's ab = ac_2 - bc_2) and ``warp(A, phi)`` lies on B (warp.py
convention): if A is B moved by t, the middle is reached by phi_A = t/2 and phi_B = -t/2, and
phi = t. Summing step flows instead of composing them is the paper's first-order approximation
(Eq. 4's path independence); it is exact for translations.

With K = 5 and a 1-pixel bound per step, one direction corrects at most
(255/15 + 255/31 + 255/63 + 255/127 + 1) ~ 32 px at 256 x 256 (align-corners pixel units), about
64 px for both; larger offsets need the rigid pre-alignment.
"""

from __future__ import annotations

import itertools
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bsafuse.config import AlignConfig
from bsafuse.model.speed import (
    channels_last,
    channels_last_gradient,
    instance_norm,
    pointwise,
    spatial_amax,
)
from bsafuse.warp import resize_flow, warp

Direction = Literal["forward", "reverse"]


def upsample2(x: Tensor) -> Tensor:
    """x2 bilinear resize of a feature map, in the align-corners convention warp.py uses."""
    h, w = x.shape[-2:]
    return F.interpolate(x, size=(2 * h, 2 * w), mode="bilinear", align_corners=True)


class SpatialCrossAttention(nn.Module):
    """Spatial attention of one map guided by another, used both ways and summed.

    attend(x, y) = x + x * gate, gate = softmax over positions of relu(conv(x)) * relu(conv(y)),
    divided by its peak so it stays in (0, 1]: a softmax over 65 536 pixels would otherwise be
    ~1e-5 everywhere and switch the branch off. forward(d, f) = attend(d, f) + attend(f, d).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, channels, 3, padding=1)
        self.key = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, d: Tensor, f: Tensor) -> Tensor:
        # attend(d, f) + attend(f, d) computed as one batch [d; f]; identical: both share every weight
        n = d.shape[0]
        both = torch.cat((d, f))  # (2N, C, h, w): rows [:n] attend(d, f), rows [n:] attend(f, d)
        if not torch.is_grad_enabled():  # the same steps in place: no gradient needs the inputs
            score = self.query(both).relu_()
            keys = self.key(both).relu_()
            score[:n].mul_(keys[n:])
            score[n:].mul_(keys[:n])
            logits = score.float()
            gate = logits.sub_(spatial_amax(logits)).exp_().to(both.dtype)  # softmax / peak
            out = gate.mul_(both).add_(both)
            return out[:n] + out[n:]
        # halves by chunk, not by slicing: the backward pass then joins their gradients in one copy
        # where each slice would fill a zero tensor of the whole batch
        keys_d, keys_f = channels_last_gradient(F.relu(self.key(both))).chunk(2)  # keep its gradient NHWC
        score = F.relu(self.query(both)) * torch.cat((keys_f, keys_d))
        score = score.float()
        gate = torch.exp(score - spatial_amax(score)).to(both.dtype)  # softmax / peak
        out_d, out_f = channels_last_gradient(torch.addcmul(both, both, gate)).chunk(2)  # x + x * gate
        return out_d + out_f


class RegistrationLayer(nn.Module):
    """FRL (direction="forward", moves A) or RRL (direction="reverse", moves B): one step (Eq. 6).

    Inputs {F_cn^i, D^(i-1)}: the current (already warped) feature pair F_A^i, F_B^i and the
    layer's running state D^(i-1); outputs the step flow phi^i of its own side and the next state
    D^i, brought up x2 to the next step's channels (None after the last step).
    """

    def __init__(
        self, channels: int, next_channels: int | None, *, direction: Direction, max_step: float
    ) -> None:
        super().__init__()
        if direction not in ("forward", "reverse"):
            raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
        self.direction = direction
        self.max_step = max_step
        self.reduce = nn.Conv2d(2 * channels, channels, 1)
        self.attention = SpatialCrossAttention(channels)
        self.refine = nn.Conv2d(channels, channels, 3, padding=1)
        self.flow_head = nn.Conv2d(channels, 2, 3, padding=1)
        # near-zero head: an untrained model starts at the identity warp
        nn.init.normal_(self.flow_head.weight, std=1e-5)
        nn.init.zeros_(self.flow_head.bias)  # type: ignore[arg-type]
        self.state_up = (  # the attribute names are checkpoint keys: D goes up with `state_up`
            nn.Sequential(nn.Conv2d(channels, next_channels, 1), nn.LeakyReLU(0.2))
            if next_channels is not None
            else None
        )

    def forward(self, feat_a: Tensor, feat_b: Tensor, d: Tensor) -> tuple[Tensor, Tensor | None]:
        own, other = (feat_a, feat_b) if self.direction == "forward" else (feat_b, feat_a)
        f_cn = pointwise(torch.cat((own, other), dim=1), self.reduce)  # F_cn^i, reduced to C: (N, C, h, w)
        x = self.attention(d, f_cn)
        x = x + F.leaky_relu(self.refine(x), 0.2)  # D^i
        flow = torch.tanh(self.flow_head(x).float()) * self.max_step  # (N, 2, h, w) px of this scale
        if self.state_up is None:
            return flow, None
        reduce, act = self.state_up
        # state_up(up2(D^i)) computed as act(up2(conv1x1(D^i))); identical: a 1x1 conv commutes with up2
        return flow, act(upsample2(pointwise(x, reduce)))  # (N, C_next, 2h, 2w)


class FeatureUp(nn.Sequential):
    """The x2 upsampling of Eq. 6, F^(i+1) = up2(W(F^i, phi^i)): bilinear, 1x1 conv, 3x3 conv,
    InstanceNorm, LeakyReLU (one module per level, shared by both sides)."""

    def __init__(self, channels: int, next_channels: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(channels, next_channels, 1),
            nn.Conv2d(next_channels, next_channels, 3, padding=1),
            nn.InstanceNorm2d(next_channels),
            nn.LeakyReLU(0.2),
        )

    def forward(self, x: Tensor) -> Tensor:
        up, reduce, spatial, norm, act = self
        # up then 1x1 conv computed as 1x1 conv then up; identical: a 1x1 conv commutes with bilinear
        x = up(pointwise(x, reduce))  # (N, C_next, 2h, 2w)
        return act(instance_norm(spatial(x), norm))  # type: ignore[arg-type]


class AlignmentOutput(NamedTuple):
    flow: Tensor  # (N, 2, H, W) phi = phi_A - phi_B, warps A onto B
    flows_a: tuple[Tensor, ...]  # K step flows of A, coarse to fine, (N, 2, h_i, w_i)
    flows_b: tuple[Tensor, ...]  # K step flows of B


class BidirectionalAlignment(nn.Module):
    """BSFA: K FRLs and K RRLs; `ups[i]` brings both sides' features from step i to i+1 (Eq. 6)."""

    def __init__(self, cfg: AlignConfig) -> None:
        super().__init__()
        chans = cfg.channels
        nxt: list[int | None] = [*chans[1:], None]
        self.forward_layers = nn.ModuleList(
            [
                RegistrationLayer(c, n, direction="forward", max_step=cfg.max_step)
                for c, n in zip(chans, nxt, strict=True)
            ]
        )
        self.reverse_layers = nn.ModuleList(
            [
                RegistrationLayer(c, n, direction="reverse", max_step=cfg.max_step)
                for c, n in zip(chans, nxt, strict=True)
            ]
        )
        self.ups = nn.ModuleList([FeatureUp(c, n) for c, n in itertools.pairwise(chans)])

    def forward(self, map_a: Tensor, map_b: Tensor, size: tuple[int, int]) -> AlignmentOutput:
        """map_a, map_b: (N, C_0, h_0, w_0) transferred token maps; size: full (H, W)."""
        feat_a, feat_b = map_a, map_b  # F_A^1, F_B^1
        d_a, d_b = map_a, map_b  # D_A^0 of the FRLs, D_B^0 of the RRLs
        flows_a: list[Tensor] = []
        flows_b: list[Tensor] = []
        for i, (frl, rrl) in enumerate(zip(self.forward_layers, self.reverse_layers, strict=True)):
            flow_a, d_a = frl(feat_a, feat_b, d_a)
            flow_b, d_b = rrl(feat_a, feat_b, d_b)
            flows_a.append(flow_a)
            flows_b.append(flow_b)
            if i < len(self.ups):
                # Eq. 6: F_j^(i+1) = up2(W(F_j^i, phi_j^i)), j = A, B, for both sides as one batch (the
                # warp and the shared up-module act per sample, so batching changes nothing)
                both = channels_last_gradient(torch.cat((feat_a, feat_b)))
                warped = warp(both, torch.cat((flow_a, flow_b)))
                feat_a, feat_b = channels_last_gradient(self.ups[i](channels_last(warped))).chunk(2, dim=0)
        # Eq. 7's two sums computed as sum_i up(phi_A^i - phi_B^i); identical because up is linear
        flow = total_flow([fa - fb for fa, fb in zip(flows_a, flows_b, strict=True)], size)
        return AlignmentOutput(flow, tuple(flows_a), tuple(flows_b))


def total_flow(step_flows: list[Tensor] | tuple[Tensor, ...], size: tuple[int, int]) -> Tensor:
    """Eq. 7: the sum of step flows, each resized to `size` with its vectors rescaled (fp32)."""
    with torch.autocast(device_type=step_flows[0].device.type, enabled=False):
        total = resize_flow(step_flows[0].float(), size)
        for flow in step_flows[1:]:
            total = total + resize_flow(flow.float(), size)
    return total
