"""Op-level exact rewrites that the model's forward methods call.

Each helper computes the same function as the plain operation it stands for (up to float
rounding), with the same parameters, so checkpoints and training are unaffected. The plain
transcription of the network lives in model/reference.py; tests/test_perf_equivalence.py checks
the two agree within 1e-4 on whole-network outputs and gradients.

- *Composed 1x1 -> 3x3 convolutions*: model/composed_conv.py.
- *channels_last.* Convolutions, the channel LayerNorm and bilinear resizes run on NHWC memory
  without layout round trips (oneDNN's native layout on CPUs, tensor cores' on GPUs).
- *InstanceNorm as GroupNorm.* One group per channel is the same normalisation, and group_norm
  keeps NHWC memory where instance_norm would copy to NCHW.
- *LayerNorm over a few channels in NCHW.* On NHWC memory a layer norm over 3 channels reduces
  rows of 3 numbers (4.2 ms for 2 x 3 x 256 x 256 on one core); moved to NCHW, its moments are
  sums of 3 planes (0.9 ms with both copies). Up to 8 channels (8: 5.6 -> 4.1 ms for
  2 x 8 x 256 x 256; 12 would be slower, 3.3 -> 3.8 ms).
- *Spatial maxima in two steps.* On NHWC memory `amax` over H and W reduces the outer dimensions,
  a slow path (3.3 ms for 2 x 8 x 256 x 256 on one core); over a (N, a, P / a * C) view of the
  pixel rows it is two fast reductions (0.16 ms), in training too.
- *1x1 convs in oneDNN at inference.* Without a gradient, on CPU maps of 8 channels or more and
  128 x 128 pixels or more, oneDNN's NHWC 1x1 conv beats the BLAS product of the pixel rows
  (whose few output columns are a slow shape for it): paper network 1.03 x at batch 1 and 8.
- *1x1 convs as linear maps of the pixel rows, and NHWC gradients.* PyTorch runs a 1x1 conv on
  NHWC input through a generic path whose input gradient comes back NCHW; grid_sample's backward
  and the backward of a batch slice do the same. Every op behind them in the backward pass then
  mixed layouts (3x3 convs' weight gradients, GELU's, the gating product's), 2-4x slower: 1.4 s
  of a 3.2 s training step at batch 2 on one core ran on mixed layouts, 0.34 s after the fix
  (`pointwise`, `channels_last_gradient`).
- *GELU over the pixel rows.* On NHWC memory GELU takes a slower path than on the same numbers
  as one contiguous run (1.6x forward, 1.8x backward at 2 x 32 x 256 x 256); same bits (`gelu`).
- *Channel attention from one Gram matrix.* MDTA's softmax reads only the C x C products of q and
  k after their L2 normalisation over pixels: the products of the raw maps divided by their norms,
  and the norms are the Gram matrix's diagonal. One (2C x HW) x (HW x 2C) product replaces two
  normalised copies of q and k; the per-head attention and the 1x1 output projection, both linear
  maps of v's channels, multiply into one C x C matrix per sample, applied to v in one product.

The forward methods' other exact rewrites are commented where they are used: a 1x1 conv before
rather than after an x2 bilinear resize (they commute, as bilinear weights sum to 1: 4x fewer
multiply-adds), shared-weight branches run as one batch, the channel-attention product
transposed, the flows resized once as differences, one warp for the image and its coverage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def channels_last(x: Tensor) -> Tensor:
    """A 4-D `x` in channels_last memory (a no-op when it already is); other tensors as they are."""
    if x.ndim != 4:
        return x
    return x.contiguous(memory_format=torch.channels_last)


def pointwise(x: Tensor, conv: nn.Module) -> Tensor:
    """``conv(x)`` for a 1x1 conv (stride 1, no groups), as a linear map of the NHWC pixel rows.

    The same products as the conv, but the result and, in training, the gradient of `x` stay in
    channels_last memory: PyTorch runs 1x1 convs on NHWC input through a generic path whose
    input gradient comes back in NCHW, and every op behind it in the backward pass (GELU's, the
    gating product's, the 3x3 convs' weight gradients) then ran on mixed layouts, 2-4x slower.
    Without a gradient, large maps go through oneDNN's NHWC 1x1 conv (`_onednn_pointwise`).
    Other convs run as they are. Shapes: (N, C, H, W) -> (N, O, H, W), NHWC memory.
    """
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        return conv(x)
    if (conv.kernel_size, conv.stride, conv.padding) != ((1, 1), (1, 1), (0, 0)):
        return conv(x)
    if _onednn_pointwise(x, conv):
        return F.conv2d(channels_last(x), conv.weight, conv.bias)
    n, _, h, w = x.shape
    out = F.linear(pixel_rows(channels_last(x)), conv.weight.flatten(1), conv.bias)  # (N, HW, O)
    return out.view(n, h, w, -1).permute(0, 3, 1, 2)


ONEDNN_POINTWISE_CHANNELS = 8  # from this many input channels ...
ONEDNN_POINTWISE_PIXELS = 128 * 128  # ... and this many pixels, inference runs 1x1 convs in oneDNN


def _onednn_pointwise(x: Tensor, conv: nn.Conv2d) -> bool:
    """Whether `pointwise` should run oneDNN's NHWC 1x1 conv instead of a matrix product: on a
    CPU, when no gradient is needed (its input gradient would come back NCHW), on large maps of
    8 channels or more. There the matrix product has few output columns, a slow shape for the
    BLAS (2 x 32 x 256 x 256 -> 8 channels, 2 threads: 3.3 against 1.8 ms); from one channel
    oneDNN is the slower (1.1 against 3.6 ms), and on the 16-64 px maps they are alike."""
    if x.device.type != "cpu" or (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)):
        return False
    return x.shape[1] >= ONEDNN_POINTWISE_CHANNELS and x.shape[-2] * x.shape[-1] >= ONEDNN_POINTWISE_PIXELS


class _GradientInChannelsLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return channels_last(grad)


def channels_last_gradient(x: Tensor) -> Tensor:
    """`x` itself in the forward pass; in the backward pass its gradient is put in channels_last
    memory before it flows on. For the inputs of ops whose backward returns NCHW gradients
    (grid_sample's, a batch slice's): without it every op behind them mixes layouts in the
    backward pass."""
    if not (torch.is_grad_enabled() and x.requires_grad) or x.ndim != 4:
        return x
    out: Tensor = _GradientInChannelsLast.apply(x)
    return out


def gelu(x: Tensor) -> Tensor:
    """``F.gelu(x)``; an (N, C, H, W) map in channels_last memory goes through its pixel rows.

    The same function to the bit, but on NHWC memory GELU takes another, slower path in both
    directions (2 x 32 x 256 x 256, one core: 6.2 ms forward, 9.9 ms backward) than on the same
    numbers as one contiguous run (3.8 ms, 5.5 ms).
    """
    if x.ndim != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return F.gelu(x)
    n, c, h, w = x.shape
    return F.gelu(pixel_rows(x)).view(n, h, w, c).permute(0, 3, 1, 2)


def instance_norm(x: Tensor, norm: nn.InstanceNorm2d) -> Tensor:
    """`norm(x)` for a stateless InstanceNorm2d, as a per-channel group norm that keeps NHWC memory."""
    if norm.affine or norm.track_running_stats:
        return norm(x)
    return F.group_norm(x, x.shape[1], eps=norm.eps)


def pixel_rows(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, H * W, C): a view on channels_last memory (a copy otherwise)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c)


def spatial_amax(x: Tensor) -> Tensor:
    """``x.amax(dim=(-2, -1), keepdim=True)`` of an (N, C, H, W) map, in two steps on NHWC memory.

    On NHWC memory `amax` over H and W reduces rows of C numbers, a slow path (3.3 ms for
    2 x 8 x 256 x 256 on one core). Viewed as (N, a, P / a * C) with a ~ sqrt(P), the first step
    reduces over the outer dimension with long contiguous rows (vectorised), the second over the
    a-fold shorter rest: 0.16 ms. Its gradient in training also stays in NHWC memory.
    """
    n, c, h, w = x.shape
    pixels = h * w
    outer = 1 << max((pixels.bit_length() - 1) // 2, 0)  # a power of two near sqrt(P)
    if c == 1 or pixels % outer or not x.is_contiguous(memory_format=torch.channels_last):
        return x.amax(dim=(-2, -1), keepdim=True)
    part = pixel_rows(x).reshape(n, outer, (pixels // outer) * c).amax(dim=1)  # (N, P / a * C)
    return part.view(n, pixels // outer, c).amax(dim=1).view(n, c, 1, 1)


def channel_attention(qkv: Tensor, heads: int, temperature: Tensor, project: nn.Conv2d) -> Tensor:
    """MDTA after its q, k, v convolutions: ``project(softmax(q^ k^T * t) v)`` per head, q^ and k^
    L2-normalised over the pixels (see the module docstring for the rewrite).

    qkv: (N, 3C, H, W), q, k, v stacked; temperature: (heads, 1, 1); returns (N, C, H, W), NHWC
    memory. The Gram matrix and the softmax run in float32.
    """
    n, c3, h, w = qkv.shape
    c = c3 // 3
    d = c // heads
    rows = pixel_rows(qkv)  # (N, HW, 3C)
    # split, not sliced twice: the backward pass joins the two gradients in one copy
    qk_rows, v = rows.split((2 * c, c), dim=-1)
    with torch.autocast(device_type=qkv.device.type, enabled=False):
        qk = qk_rows.float()
        gram = qk.transpose(1, 2) @ qk  # (N, 2C, 2C)
        norms = gram.diagonal(dim1=1, dim2=2).sqrt().clamp_min(1e-12)  # F.normalize's eps
        logits = gram[:, :c, c:] / (norms[:, :c, None] * norms[:, None, c:])  # (N, C, C): q^_i . k^_j
        # the heads' diagonal blocks: (N, g, d, g, d) -> (N, g, d, d)
        logits = logits.unflatten(1, (heads, d)).unflatten(3, (heads, d)).diagonal(dim1=1, dim2=3)
        attn = torch.softmax(logits.permute(0, 3, 1, 2) * temperature.float(), dim=-1)  # (N, g, d, d)
        # project o <- channel (g, i) <- v channel (g, j): one C x C matrix per sample
        weight = project.weight.float().reshape(c, heads, d)
        mixing = torch.einsum("ogi,ngij->nogj", weight, attn).reshape(n, c, c)
    bias = project.bias if project.bias is not None else v.new_zeros(c)
    out = torch.baddbmm(bias.to(v.dtype), v, mixing.transpose(1, 2).to(v.dtype))  # (N, HW, C)
    return out.view(n, h, w, c).permute(0, 3, 1, 2)



FEW_CHANNELS = 8  # at most this many channels: the channel LayerNorm runs in NCHW memory


def layer_norm_channels(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the channels of an (N, C, H, W) map, in the memory format it came in."""
    if x.shape[1] > FEW_CHANNELS or not x.is_contiguous(memory_format=torch.channels_last):
        out = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], weight, bias, eps)
        return out.permute(0, 3, 1, 2)  # views on channels_last memory
    planes = x.contiguous()  # NCHW: the moments are sums of C planes
    centred = planes - planes.mean(dim=1, keepdim=True)  # (var_mean over dim 1 is a slow path)
    out = centred * torch.rsqrt(centred.square().mean(dim=1, keepdim=True) + eps)
    out = torch.addcmul(bias.view(1, -1, 1, 1), out, weight.view(1, -1, 1, 1))
    return out.contiguous(memory_format=torch.channels_last)
