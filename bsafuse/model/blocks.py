"""Generic building blocks: the Restormer block (MDTA + GDFN), a pre-norm Transformer layer and
the patch tokeniser. Nothing here knows about images A and B."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from bsafuse.model.composed_conv import pointwise_then_spatial
from bsafuse.model.speed import channel_attention, gelu, layer_norm_channels, pointwise


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (N, C, H, W) map, as in Restormer.

    On channels_last memory the permutes are views: no copy either way (up to 4 channels the
    moments are taken in NCHW memory instead: `speed.layer_norm_channels`).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm_channels(x, self.weight, self.bias, 1e-5)


class ChannelAttention(nn.Module):
    """MDTA (Restormer, Zamir et al. 2022): attention between channels, per head.

    q, k and v come from a 1x1 conv and a full 3x3 conv each (the three 3x3 convs run as one
    grouped conv). q and k are L2-normalised over the pixels and their C/h x C/h products scaled
    by a learned temperature, so the softmax neither saturates at large images nor starves the
    q/k convs of gradient (the public BSAFusion code's unnormalised single softmax does both).
    The attention and the 1x1 projection run as `speed.channel_attention` (one Gram matrix).
    """

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.qkv_spatial = nn.Conv2d(3 * channels, 3 * channels, 3, padding=1, groups=3)
        self.project = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        (qkv,) = pointwise_then_spatial(x, self.qkv, self.qkv_spatial)  # (n, 3C, h, w)
        # softmax(q^ k^T t) v and the projection from one Gram matrix of q, k (model/speed.py)
        return channel_attention(qkv, self.heads, self.temperature, self.project)


class GatedFeedForward(nn.Module):
    """GDFN: two branches (1x1 conv to hidden, full 3x3 conv), GELU(a) * b, 1x1 back to C."""

    def __init__(self, channels: int, expansion: int) -> None:
        super().__init__()
        hidden = channels * expansion
        self.expand = nn.Conv2d(channels, 2 * hidden, 1)  # both branches in one conv
        self.spatial = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2)
        self.project = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        a, b = pointwise_then_spatial(x, self.expand, self.spatial, parts=2)
        gate = gelu(a)
        # in place where no gradient is kept (mul_'s backward would need the overwritten GELU)
        return pointwise(gate.mul_(b) if not torch.is_grad_enabled() else gate * b, self.project)


class RestormerBlock(nn.Module):
    """1x1 conv in -> out channels, then x + MDTA(LN(x)) and x + GDFN(LN(x))."""

    def __init__(self, in_channels: int, out_channels: int, *, heads: int, expansion: int) -> None:
        super().__init__()
        self.embed = nn.Conv2d(in_channels, out_channels, 1)
        self.norm1 = LayerNorm2d(out_channels)
        self.attention = ChannelAttention(out_channels, heads)
        self.norm2 = LayerNorm2d(out_channels)
        self.feed_forward = GatedFeedForward(out_channels, expansion)

    def forward(self, x: Tensor) -> Tensor:
        x = pointwise(x, self.embed)
        x = x + self.attention(self.norm1(x))
        return x + self.feed_forward(self.norm2(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens with F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "n t (three g d) -> three n g t d", three=3, g=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (n, g, t, d)
        return self.project(rearrange(out, "n g t d -> n t (g d)"))


class TransformerLayer(nn.Module):
    """Pre-norm Transformer layer: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, *, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchTokens(nn.Sequential):
    """(N, C, H, W) map -> (N, P, dim) tokens by a patch x patch, stride-patch conv."""

    def __init__(self, channels: int, dim: int, patch: int) -> None:
        super().__init__(
            nn.Conv2d(channels, dim, patch, stride=patch),  # (N, dim, H/patch, W/patch)
            Rearrange("n d h w -> n (h w) d"),
        )
