"""A 1x1 conv followed by a 3x3 conv, run as one composed 3x3 conv: an exact rewrite (see speed.py).

Each Restormer branch is a 1x1 conv (C -> M) followed by a grouped 3x3 conv (M -> M). Both are
linear, so they are one 3x3 conv C -> M whose kernel is the product of the two. For the gated
feed-forward (M = 2 * 4C, two groups of 4C inputs) that is 4x fewer multiply-adds (the
network's heaviest layers, at full resolution). The 1x1 conv's bias would be zero-padded at the
image border by the 3x3 conv: its contribution is a constant map whose border pixels miss the
taps that fall on the padding, subtracted there (an all-ones input channel, padded with zeros
like the rest, does the same for other kernel shapes and in training). The branches of the
gated feed-forward run as one conv each, so each is contiguous in memory: GELU on a strided half
of a 24- or 96-channel map took 5-10x as long as on a contiguous one.

Training on a CPU, the composed conv has a backward pass of its own (`_SameConv3x3`), which
leaves out the all-ones channel: autograd's backward of the conv on the stacked input had oneDNN
work on 9-13 channels, 4-5x its forward pass on an AVX2 machine (2026-12-06). There the kernel
gradient is an im2col matrix product and the input gradient a forward conv with the flipped
kernel (real channels only): a GDFN's backward at full resolution (paper config, batch 2)
191-205 -> 138-156 ms on one core. On AVX-512 CPUs oneDNN's backward of the conv on the real
channels is the faster, the all-ones channel's kernel gradient then a few sums of the output
gradient (`_ones_gradient`): a `paper` training step 1.00-1.03 x faster at batch 2, 1.05-1.06 x
at batch 8, 1.03-1.06 x on one thread than with the im2col one (2026-12-08, old and new
interleaved in one process), where with oneDNN held to AVX2 it was 0.95 x. Only the input is
saved, either way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bsafuse.model.speed import channels_last, pixel_rows


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
    bias = spatial.bias if spatial.bias is not None else kernel.new_zeros(kernel.shape[0])
    # training on a CPU from 4 channels up: the bias as an all-ones channel, a backward pass of its own
    if same and spatial.kernel_size == (3, 3) and torch.is_grad_enabled() and _own_backward(x):
        return _SameConv3x3.apply(channels_last(x), kernel, bias, parts)
    # the general form, one-pixel rows or columns, and other training (each in-place op of the
    # border fix would copy the whole gradient): the bias as an all-ones input channel
    if torch.is_grad_enabled() or not same or spatial.kernel_size != (3, 3) or min(x.shape[-2:]) < 2:
        stacked = _with_ones(channels_last(x))  # NHWC, as the kernel
        return tuple(
            F.conv2d(stacked, k, b, stride=spatial.stride, padding=spatial.padding, dilation=spatial.dilation)
            for k, b in zip(kernel.chunk(parts), bias.chunk(parts), strict=True)
        )
    outs = []
    for k, b in zip(kernel.chunk(parts), bias.chunk(parts), strict=True):
        outs.append(_bias_with_border(F.conv2d(x, k[:, :c], b + k[:, c].sum((-2, -1)), padding=1), k[:, c]))
    return tuple(outs)


COLUMN_BYTES = 32 << 20  # the im2col backward's scratch per chunk of samples (shifted rows, partial gradients)


def _onednn_backward() -> bool:
    """Whether the composed convs' backward runs in oneDNN (AVX-512 CPUs) or as im2col products."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def _own_backward(x: Tensor) -> bool:
    """Whether `_SameConv3x3` should run: float32 on a CPU, outside autocast, from 4 input channels
    with oneDNN's backward and from 8 with im2col's; below that autograd's backward on the stacked
    input was the faster (AVX-512, `paper`, batch 8, the 3-channel deep Restormer block: a step
    0.96 x with oneDNN's on the real channels; AVX2, 3 channels: im2col's 35 ms against 26 ms)."""
    cpu = x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    return cpu and x.shape[1] >= (4 if _onednn_backward() else 8)


class _SameConv3x3(torch.autograd.Function):
    """The composed 3x3 'same' convs of one input (its bias as an all-ones channel), one per part
    of the kernel, with a backward pass that leaves the all-ones channel to sums (module docstring).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, kernel: Tensor, bias: Tensor, parts: int) -> tuple[Tensor, ...]:
        ctx.save_for_backward(x, kernel)
        ctx.parts = parts
        stacked = _with_ones(x)
        pairs = zip(kernel.chunk(parts), bias.chunk(parts), strict=True)
        return tuple(F.conv2d(stacked, k, b, padding=1) for k, b in pairs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        x, kernel = ctx.saved_tensors
        grads = tuple(channels_last(g) for g in grads)
        need_x, need_kernel = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        gradients = _onednn_gradients if _onednn_backward() else _im2col_gradients
        grad_x, grad_kernel = gradients(x, kernel, grads, need_x=need_x, need_kernel=need_kernel)
        # the all-ones channel's centre tap sees every pixel: its gradient is the bias's
        grad_bias = grad_kernel[:, -1, 1, 1].clone() if grad_kernel is not None else None
        return grad_x, grad_kernel, grad_bias, None


def _onednn_gradients(
    x: Tensor, kernel: Tensor, grads: tuple[Tensor, ...], *, need_x: bool, need_kernel: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Input and kernel gradients of the composed conv (kernel (O, C + 1, 3, 3), its last input
    channel all ones) from the output parts' gradients: oneDNN's conv backward on the real
    channels, the all-ones channel's kernel gradient from sums (`_ones_gradient`)."""
    c = x.shape[1]
    grad_x: Tensor | None = None
    kernel_parts = []
    for grad, part in zip(grads, kernel.chunk(len(grads)), strict=True):
        grad_x_part, grad_part, _ = torch.ops.aten.convolution_backward(
            grad, x, channels_last(part[:, :c]), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
            [need_x, need_kernel, False],
        )
        if need_x:
            grad_x = grad_x_part if grad_x is None else grad_x.add_(grad_x_part)
        if need_kernel:
            kernel_parts.append(torch.cat((grad_part, _ones_gradient(grad)[:, None]), dim=1))
    return grad_x, torch.cat(kernel_parts) if need_kernel else None


def _im2col_gradients(
    x: Tensor, kernel: Tensor, grads: tuple[Tensor, ...], *, need_x: bool, need_kernel: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The same gradients as `_onednn_gradients`: the input's a correlation with the flipped
    kernel (real channels only), the kernel's im2col products; a few samples at a time."""
    grad_x = grad_kernel = None
    if need_x:
        transposed = kernel[:, : x.shape[1]].flip(2, 3).transpose(0, 1)  # (C, O, 3, 3)
        flipped = [channels_last(k) for k in transposed.chunk(len(grads), dim=1)]
        grad_x = F.conv2d(grads[0], flipped[0], padding=1)  # (N, C, H, W)
        step = _samples_per_chunk(grads[0])
        for g, k in zip(grads[1:], flipped[1:], strict=True):  # other parts: a few samples at a time
            for start in range(0, len(g), step):
                grad_x[start : start + step].add_(F.conv2d(g[start : start + step], k, padding=1))
    if need_kernel:
        grad_kernel = _weight_gradient(x, grads, kernel.shape[0])
    return grad_x, grad_kernel


def _ones_gradient(grad: Tensor) -> Tensor:
    """Kernel gradient (O, 3, 3) of a 3x3 'same' conv's all-ones input channel, from the output
    gradient (N, O, H, W): tap (i, j) sums the output gradient over the pixels whose neighbour
    (i - 1, j - 1) lies in the image, i.e. over all but the first or last row or column. One pass
    over the gradient's NHWC memory, then its edges."""
    pixels = grad.permute(0, 2, 3, 1)  # (N, H, W, O), a view of NHWC memory
    total = pixels.sum(dim=(0, 1, 2))
    zero = torch.zeros_like(total)
    # kernel row 0 reads the row above: none for output row 0; kernel row 2 none for the last row
    row_miss = torch.stack((pixels[:, 0].sum(dim=(0, 1)), zero, pixels[:, -1].sum(dim=(0, 1))), dim=1)
    col_miss = torch.stack((pixels[:, :, 0].sum(dim=(0, 1)), zero, pixels[:, :, -1].sum(dim=(0, 1))), dim=1)
    corners = total.new_zeros(total.shape[0], 3, 3)  # missed by a row and a column: counted back once
    corners[:, ::2, ::2] = pixels[:, [0, -1]][:, :, [0, -1]].sum(dim=0).permute(2, 0, 1)
    return total[:, None, None] - row_miss[:, :, None] - col_miss[:, None, :] + corners


def _with_ones(x: Tensor) -> Tensor:
    """(N, C, H, W) NHWC -> (N, C + 1, H, W) NHWC with an all-ones last channel."""
    ones = x.new_ones((x.shape[0], 1, *x.shape[-2:])).contiguous(memory_format=torch.channels_last)
    return channels_last(torch.cat((x, ones), dim=1))


def _samples_per_chunk(x: Tensor, channels: int | None = None) -> int:
    """How many samples of `x` (N, C, H, W), with `channels` instead of C, fit in COLUMN_BYTES."""
    per_sample = x[0].numel() // x.shape[1] * (channels or x.shape[1]) * x.element_size()
    return max(1, COLUMN_BYTES // per_sample)


def _weight_gradient(x: Tensor, grads: tuple[Tensor, ...], out_channels: int) -> Tensor:
    """Gradient of the composed 3x3 'same' conv's kernel (O, C + 1, 3, 3), its last input channel
    all ones, from the real input `x` (N, C, H, W) and the gradients of the output parts (each
    (N, O / parts, H, W), NHWC), as im2col products, a few samples at a time."""
    n, c, h, w = x.shape
    c1 = c + 1
    out = x.new_empty(out_channels, 9 * c1)  # (O, 3 * 3 * (C + 1)): the NHWC memory of the kernel
    rows = [pixel_rows(g) for g in grads]  # (N, HW, O / parts) each
    step = _samples_per_chunk(x, 9 * c1)  # samples per product
    source = pixel_rows(channels_last(x)).view(n, h, w, c)
    for start in range(0, n, step):
        stop = min(n, start + step)
        padded = x.new_zeros(stop - start, h + 2, w + 2, c1)  # the zero border of the conv
        padded[:, 1:-1, 1:-1, :c] = source[start:stop]
        padded[:, 1:-1, 1:-1, c] = 1.0
        # the 3 x 3 neighbourhood of every pixel: three rows of 3(C + 1) contiguous numbers each
        # in `padded`, gathered by one copy from an overlapping view
        sn, sy, sx, _ = padded.stride()
        columns = x.new_empty(stop - start, h, w, 3, 3 * c1)
        columns.copy_(padded.as_strided(columns.shape, (sn, sy, sx, sy, 1)))
        flat = columns.view(-1, 9 * c1)
        for part, g in zip(out.chunk(len(rows)), rows, strict=True):
            products = _long_product(g[start:stop].reshape(-1, g.shape[-1]), flat)
            part.copy_(products) if start == 0 else part.add_(products)
    return out.view(out_channels, 3, 3, c1).permute(0, 3, 1, 2)


def _long_product(a: Tensor, b: Tensor, blocks: int = 8) -> Tensor:
    """``a.T @ b`` for (K, M) and (K, N) with K much larger than M and N: as `blocks` products
    over slices of K, summed, so that threads share the work (one product of this shape used the
    second core for a 1.6x speed-up, eight for 2x)."""
    k = a.shape[0]
    if k % blocks:
        return a.t() @ b
    return torch.bmm(a.view(blocks, k // blocks, -1).transpose(1, 2), b.view(blocks, k // blocks, -1)).sum(0)


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
