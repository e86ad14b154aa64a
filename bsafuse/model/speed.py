"""Op-level exact rewrites that the model's forward methods call.

Each helper computes the same function as the plain operation it stands for (up to float
rounding), with the same parameters, so checkpoints and training are unaffected. The plain
transcription of the network lives in model/reference.py; tests/test_perf_equivalence.py checks
the two agree within 1e-4 on whole-network outputs and gradients.

- *Composed 1x1 -> 3x3 convolutions.* Each Restormer branch is a 1x1 conv (C -> M) followed by a
  grouped 3x3 conv (M -> M). Both are linear, so they are one 3x3 conv C -> M whose kernel is the
  product of the two. For the gated feed-forward (M = 2 * 4C, two groups of 4C inputs) that is 4x
  fewer multiply-adds (the network's heaviest layers, at full resolution). The 1x1 conv's bias
  would be zero-padded at the image border by the 3x3 conv: its contribution is a constant map
  whose border pixels miss the taps that fall on the padding, subtracted there (an all-ones input
  channel, padded with zeros like the rest, does the same for other kernel shapes). The branches
  of the gated feed-forward run as one conv each, so each is contiguous in memory: GELU on a
  strided half of a 24- or 96-channel map took 5-10x as long as on a contiguous one.
- *A backward pass of their own for the composed convolutions (training on a CPU).* From NHWC
  inputs of 8-13 channels to 24-96 outputs oneDNN's backward pass took 4-5x the forward; the
  weight gradient as one im2col product and the input gradient as a forward conv with the
  flipped kernel took a GDFN's backward from 205-213 to 145-156 ms (paper config, batch 2, one
  core; `_SameConv3x3`). Fewer channels keep oneDNN's.
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
- *1x1 convs as linear maps of the pixel rows, and NHWC gradients.* PyTorch runs a 1x1 conv on
  NHWC input through a generic path whose input gradient comes back NCHW; grid_sample's backward
  and the backward of a batch slice do the same. Every op behind them in the backward pass then
  mixed layouts (3x3 convs' weight gradients, GELU's, the gating product's), 2-4x slower: 1.4 s
  of a 3.2 s training step at batch 2 on one core ran on mixed layouts, 0.34 s after the fix
  (`pointwise`, `channels_last_gradient`).
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

from typing import Any

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
    Other convs run as they are. Shapes: (N, C, H, W) -> (N, O, H, W), NHWC memory.
    """
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        return conv(x)
    if (conv.kernel_size, conv.stride, conv.padding) != ((1, 1), (1, 1), (0, 0)):
        return conv(x)
    n, _, h, w = x.shape
    out = F.linear(pixel_rows(channels_last(x)), conv.weight.flatten(1), conv.bias)  # (N, HW, O)
    return out.view(n, h, w, -1).permute(0, 3, 1, 2)


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


def composed_kernel(pointwise: nn.Conv2d, spatial: nn.Conv2d) -> Tensor:
    """Kernel of the single conv equal to ``spatial(pointwise(x))``, with the bias channel last.

    Shapes: pointwise (M, C, 1, 1), spatial (O, M / g, k, k) with g groups -> (O, C + 1, k, k).
    Output o of group j reads pointwise rows j*M/g .. (j+1)*M/g - 1; input channel C is the
    pointwise bias, applied to an all-ones channel.
    """
    groups = spatial.groups
    out_ch, per_group, k1, k2 = spatial.weight.shape
    w1 = pointwise.weight.flatten(1)  # (M, C)
    b1 = pointwise.bias if pointwise.bias is not None else w1.new_zeros(w1.shape[0])
    w1 = torch.cat((w1, b1[:, None]), dim=1).view(groups, per_group, -1)  # (g, M/g, C + 1)
    w3 = spatial.weight.view(groups, out_ch // groups, per_group, k1, k2)  # (g, O/g, M/g, k, k)
    with torch.autocast(device_type=w1.device.type, enabled=False):  # compose in fp32
        kernel = torch.einsum("goikl,gic->gockl", w3.float(), w1.float())  # (g, O/g, C + 1, k, k)
    return kernel.reshape(out_ch, -1, k1, k2).contiguous(memory_format=torch.channels_last)


def pointwise_then_spatial(
    x: Tensor, pointwise: nn.Conv2d, spatial: nn.Conv2d, *, parts: int = 1
) -> tuple[Tensor, ...]:
    """``spatial(pointwise(x))`` for a 1x1 conv followed by a (grouped) conv with zero padding,
    split into `parts` equal chunks of output channels (each its own contiguous NHWC tensor).

    Computed as one conv with the composed kernel per part (see the module docstring); the
    pointwise bias, which the zero padding must not see, is a constant map with a corrected
    border (`_bias_with_border`). Other layer pairs run as they are.
    Shapes: (N, C, H, W) -> `parts` x (N, O / parts, H, W).
    """
    if pointwise.kernel_size != (1, 1) or spatial.padding_mode != "zeros":
        return spatial(pointwise(x)).chunk(parts, dim=1)
    kernel = composed_kernel(pointwise, spatial).to(x.dtype)
    c = x.shape[1]
    same = spatial.stride == (1, 1) and spatial.dilation == (1, 1) and spatial.padding == (1, 1)
    # the general form, one-pixel rows or columns, and training (each in-place op of the border
    # fix would copy the whole gradient): the bias as an all-ones input channel
    bias = spatial.bias if spatial.bias is not None else kernel.new_zeros(kernel.shape[0])
    # training on a CPU from 8 channels up: the same, with a backward pass of its own (_SameConv3x3)
    if same and spatial.kernel_size == (3, 3) and torch.is_grad_enabled() and _few_channel_backward(x):
        return _SameConv3x3.apply(channels_last(x), kernel, bias, parts)
    if torch.is_grad_enabled() or not same or spatial.kernel_size != (3, 3) or min(x.shape[-2:]) < 2:
        ones = x.new_ones((x.shape[0], 1, *x.shape[-2:])).contiguous(memory_format=torch.channels_last)
        stacked = channels_last(torch.cat((channels_last(x), ones), dim=1))  # NHWC, as the kernel
        return tuple(
            F.conv2d(stacked, k, b, stride=spatial.stride, padding=spatial.padding, dilation=spatial.dilation)
            for k, b in zip(kernel.chunk(parts), bias.chunk(parts), strict=True)
        )
    outs = []
    for k, b in zip(kernel.chunk(parts), bias.chunk(parts), strict=True):
        outs.append(_bias_with_border(F.conv2d(x, k[:, :c], b + k[:, c].sum((-2, -1)), padding=1), k[:, c]))
    return tuple(outs)


MIN_CHANNELS = 8  # from 3 channels (12 out) oneDNN's own backward was faster: 26 against 35 ms
COLUMN_BYTES = 64 << 20  # at most this much memory for the shifted pixel rows of the weight gradient


def _few_channel_backward(x: Tensor) -> bool:
    """Whether `_SameConv3x3` should run: float32 on a CPU, outside autocast."""
    cpu = x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    return cpu and x.shape[1] >= MIN_CHANNELS


class _SameConv3x3(torch.autograd.Function):
    """The composed 3x3 'same' convs of one input (its bias as an all-ones channel), one per part
    of the kernel, with a backward pass for few input channels.

    oneDNN's backward for a 3x3 conv from 9-13 NHWC channels to 32-96 took 4-5x its forward
    (weight gradient 62-72 ms against a 15 ms forward, 2 x 13 -> 48 at 256 x 256, one core). Here
    the weight gradient is one matrix product of the output gradient's pixel rows with the nine
    shifted copies of the input's (im2col), and the input gradient a forward conv of the output
    gradient with the flipped kernel, for the real channels only (the all-ones channel needs none).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, kernel: Tensor, bias: Tensor, parts: int) -> tuple[Tensor, ...]:
        ctx.save_for_backward(x, kernel)
        ctx.parts = parts
        stacked = _with_ones(x)
        return tuple(
            F.conv2d(stacked, k, b, padding=1) for k, b in zip(kernel.chunk(parts), bias.chunk(parts), strict=True)
        )

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        x, kernel = ctx.saved_tensors
        grads = tuple(channels_last(g) for g in grads)
        grad_x = grad_kernel = grad_bias = None
        if ctx.needs_input_grad[0]:  # correlation with the flipped kernel, real channels only
            flipped = kernel[:, : x.shape[1]].flip(2, 3).transpose(0, 1)  # (C, O, 3, 3)
            parts = [
                F.conv2d(g, channels_last(k), padding=1)
                for g, k in zip(grads, flipped.chunk(ctx.parts, dim=1), strict=True)
            ]
            grad_x = parts[0]
            for part in parts[1:]:
                grad_x.add_(part)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_kernel = _weight_gradient(_with_ones(x), grads, kernel.shape[0])
            # the all-ones channel's centre tap sees every pixel: its gradient is the bias's
            grad_bias = grad_kernel[:, -1, 1, 1].clone()
        return grad_x, grad_kernel, grad_bias, None


def _with_ones(x: Tensor) -> Tensor:
    """(N, C, H, W) NHWC -> (N, C + 1, H, W) NHWC with an all-ones last channel."""
    ones = x.new_ones((x.shape[0], 1, *x.shape[-2:])).contiguous(memory_format=torch.channels_last)
    return channels_last(torch.cat((x, ones), dim=1))


def _weight_gradient(x: Tensor, grads: tuple[Tensor, ...], out_channels: int) -> Tensor:
    """Gradient of a 3x3 'same' conv's kernel (O, C, 3, 3) from its input `x` (N, C, H, W) and the
    gradients of its output parts (each (N, O / parts, H, W), NHWC), as im2col products."""
    n, c, h, w = x.shape
    padded = pixel_rows(channels_last(F.pad(x, (1, 1, 1, 1)))).view(n, h + 2, w + 2, c)
    out = x.new_empty(out_channels, 9 * c)  # (O, 3 * 3 * C): the NHWC memory of (O, C, 3, 3)
    rows = [pixel_rows(g) for g in grads]  # (N, HW, O / parts) each
    step = max(1, COLUMN_BYTES // (h * w * 9 * c * x.element_size()))  # samples per product
    for start in range(0, n, step):
        stop = min(n, start + step)
        # the 3 x 3 neighbourhood of every pixel: three rows of 3C contiguous numbers each in
        # `padded`, gathered by one copy from an overlapping view
        sn, sy, sx, _ = padded.stride()
        window = padded[start:stop].as_strided(
            (stop - start, h, w, 3, 3 * c), (sn, sy, sx, sy, 1), padded.storage_offset() + start * sn
        )
        columns = x.new_empty(stop - start, h, w, 3, 3 * c)
        columns.copy_(window)
        flat = columns.view(-1, 9 * c)
        for part, g in zip(out.chunk(len(rows)), rows, strict=True):
            part.addmm_(g[start:stop].reshape(-1, g.shape[-1]).t(), flat, beta=0 if start == 0 else 1)
    return out.view(out_channels, 3, 3, c).permute(0, 3, 1, 2)


def _bias_with_border(out: Tensor, taps: Tensor) -> Tensor:
    """Remove from a 3x3 'same' conv's output the bias taps that fell on the zero padding.

    `out` was computed with every tap of the bias kernel `taps` (O, 3, 3) counted; a pixel in the
    first row has no row above it, so row 0 of the taps did not apply there, and so on for the
    other edges; corners had two edges removed and get their shared tap back. In place.
    """
    h, w = out.shape[-2:]  # both at least 2 (pointwise_then_spatial): one strided view per side
    out[:, :, :: h - 1, :] -= taps[:, ::2].sum(-1)[..., None]  # rows 0, h-1 lose tap rows 0, 2
    out[:, :, :, :: w - 1] -= taps[:, :, ::2].sum(1)[:, None, :]  # columns 0, w-1
    out[:, :, :: h - 1, :: w - 1] += taps[:, ::2, ::2]  # the four corners
    return out


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
    with torch.autocast(device_type=qkv.device.type, enabled=False):
        qk = rows[..., : 2 * c].float()
        gram = qk.transpose(1, 2) @ qk  # (N, 2C, 2C)
        norms = gram.diagonal(dim1=1, dim2=2).sqrt().clamp_min(1e-12)  # F.normalize's eps
        logits = gram[:, :c, c:] / (norms[:, :c, None] * norms[:, None, c:])  # (N, C, C): q^_i . k^_j
        # the heads' diagonal blocks: (N, g, d, g, d) -> (N, g, d, d)
        logits = logits.unflatten(1, (heads, d)).unflatten(3, (heads, d)).diagonal(dim1=1, dim2=3)
        attn = torch.softmax(logits.permute(0, 3, 1, 2) * temperature.float(), dim=-1)  # (N, g, d, d)
        # project o <- channel (g, i) <- v channel (g, j): one C x C matrix per sample
        weight = project.weight.float().reshape(c, heads, d)
        mixing = torch.einsum("ogi,ngij->nogj", weight, attn).reshape(n, c, c)
    v = rows[..., 2 * c :]
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
