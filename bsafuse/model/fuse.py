"""MMFF: multimodal feature fusion (paper Eq. 10) and the reconstruction.

A = moving, B = fixed. FusionBlock i works at step i's scale on
concat(W(F^_A^i, phi at that scale), F^_B^i, G^(i-1)) and brings the result up x2 (G^0 is empty).
F^_A^i, F^_B^i (`feature_pyramid`) are the encoder's token maps *before* transfer (they keep each
modality's content), brought to step i's scale by the alignment's shared up-modules. The
reconstruction takes concat(G^J, F'_B, W(F'_A, phi)) through a Restormer block, a 3x3 conv and a
sigmoid. With ``FuseConfig.anchor = "max"`` (not in the paper; design.md §2) the conv's output is a
correction, in logits, of the aligned pair's pixel maximum: sigmoid(conv(...) + logit(max(W(I_A,
phi), I_B))), and the conv starts at zero, so that an untrained correction gives the maximum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from bsafuse.config import FuseConfig, ModelConfig
from bsafuse.model.align import upsample2
from bsafuse.model.blocks import RestormerBlock
from bsafuse.model.speed import channels_last, channels_last_gradient
from bsafuse.warp import resize_flow, warp


def feature_pyramid(maps: Tensor, ups: Iterable[Callable[[Tensor], Tensor]]) -> list[Tensor]:
    """Eq. 10's inputs F^_A^i, F^_B^i: the token maps at each FusionBLK's scale, coarse to fine.

    maps: (N, dim, h, w) pre-transfer token maps (A and B rows may be stacked); ups: the
    alignment's shared up-modules (Eq. 6's up2, here without a warp), one per further level.
    Returns 1 + len(ups) maps, level i at (h * 2**i, w * 2**i).
    """
    pyramid = [maps]
    for up in ups:
        pyramid.append(up(pyramid[-1]))
    return pyramid


class FusionBlock(nn.Module):
    """FusionBLK (Eq. 10): Restormer block on the concatenated features, then up x2."""

    def __init__(self, in_channels: int, out_channels: int, *, heads: int, expansion: int) -> None:
        super().__init__()
        self.encode = RestormerBlock(in_channels, out_channels, heads=heads, expansion=expansion)

    def forward(self, x: Tensor) -> Tensor:
        return upsample2(self.encode(x))  # (N, out, 2h, 2w)


ANCHOR_EPS = 1e-3  # the anchor is clipped to [eps, 1 - eps] before its logit (|logit| <= 6.9)


def fusion_anchor(config: FuseConfig, warped: Tensor, fixed: Tensor) -> Tensor | None:
    """What the reconstruction corrects: for anchor "max" the pixel maximum max(W(I_A, phi), I_B),
    fp32 (N, 1, H, W); None for the paper's reconstruction."""
    if config.anchor == "none":
        return None
    return torch.maximum(warped.float().clamp(0.0, 1.0), fixed.float())


def anchored(logits: Tensor, anchor: Tensor | None) -> Tensor:
    """The fused image from the reconstruction's logits: sigmoid(logits [+ logit(anchor)])."""
    if anchor is None:
        return torch.sigmoid(logits)
    return torch.sigmoid(logits.float() + torch.logit(anchor.clamp(ANCHOR_EPS, 1.0 - ANCHOR_EPS)))


class Reconstruction(nn.Module):
    """Restormer block, 3x3 conv to one channel, sigmoid: G^J and shallow features -> fused image."""

    def __init__(
        self, in_channels: int, channels: int, *, heads: int, expansion: int, anchored: bool = False
    ) -> None:
        super().__init__()
        self.encode = RestormerBlock(in_channels, channels, heads=heads, expansion=expansion)
        self.out = nn.Conv2d(channels, 1, 3, padding=1)
        self.anchored = anchored
        if anchored:
            self.start_at_anchor()

    def start_at_anchor(self) -> None:
        """Zero the last conv: the correction of the anchor starts at nothing."""
        assert self.out.bias is not None
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, x: Tensor, anchor: Tensor | None = None) -> Tensor:
        if (anchor is not None) != self.anchored:
            raise ValueError("an anchored reconstruction needs its anchor, a plain one takes none")
        return anchored(self.out(self.encode(x)), anchor)  # (N, 1, H, W)


class MultimodalFusion(nn.Module):
    """MMFF: J - 1 FusionBlocks, coarse to fine, and the Reconstruction."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        feats = cfg.align.channels
        outs = cfg.fuse.channels
        ins = [2 * feats[0]] + [2 * f + g for f, g in zip(feats[1:-1], outs[:-1], strict=True)]
        self.blocks = nn.ModuleList(
            [
                FusionBlock(i, o, heads=h, expansion=cfg.ffn_expansion)
                for i, o, h in zip(ins, outs, cfg.fuse.heads, strict=True)
            ]
        )
        self.reconstruction = Reconstruction(
            outs[-1] + 2 * cfg.encoder.shallow_channels,
            outs[-1],
            heads=cfg.fuse.reconstruction_heads,
            expansion=cfg.ffn_expansion,
            anchored=cfg.fuse.anchor == "max",
        )

    def forward(
        self,
        pyramid_a: list[Tensor],
        pyramid_b: list[Tensor],
        shallow_a: Tensor,
        shallow_b: Tensor,
        flow: Tensor,
        anchor: Tensor | None = None,
    ) -> Tensor:
        """pyramid_*: K-1 maps F^_*^i, coarse to fine; shallow_*: (N, C', H, W); flow: (N, 2, H, W);
        anchor: `fusion_anchor`'s."""
        g: Tensor | None = None
        for block, feat_a, feat_b in zip(self.blocks, pyramid_a, pyramid_b, strict=True):
            size = (feat_a.shape[-2], feat_a.shape[-1])
            flow_here = resize_flow(flow, size, antialias=True)
            aligned_a = channels_last(warp(channels_last_gradient(feat_a), flow_here))  # Eq. 10's W
            parts = (aligned_a, feat_b) if g is None else (aligned_a, feat_b, g)
            g = block(torch.cat(parts, dim=1))
        assert g is not None
        aligned_shallow = channels_last(warp(channels_last_gradient(shallow_a), flow))
        x = torch.cat((g, shallow_b, aligned_shallow), dim=1)  # (N, C_J + 2C', H, W)
        return self.reconstruction(x, anchor)
