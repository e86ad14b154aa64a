"""Op-level exact rewrites that the model's forward methods call.

Each helper computes the same function as the plain operation it stands for (up to float
rounding), with the same parameters, so checkpoints and training are unaffected. The plain
transcription of the network lives in model/reference.py; tests/test_perf_equivalence.py checks
the two agree within 1e-4 on whole-network outputs and gradients.

- *Composed 1x1 -> 3x3 convolutions.* Each Restormer branch is a 1x1 conv (C -> M) followed by a
  grouped 3x3 conv (M -> M). Both are linear, so they are one 3x3 conv C -> M whose kernel is the
  product of the two. For the gated feed-forward (M = 2 * 4C, two groups of 4C inputs) that is 4x
  fewer multiply-adds (the network's heaviest layers, at full resolution). The 1x1 conv's bias
  would be zero-padded at the image border by the 3x3 conv: it rides along as an extra all-ones
  input channel, which the 3x3 conv pads with zeros just the same, so borders stay exact.
- *channels_last.* Convolutions, the channel LayerNorm and bilinear resizes run on NHWC memory
  without layout round trips (oneDNN's native layout on CPUs, tensor cores' on GPUs).
- *InstanceNorm as GroupNorm.* One group per channel is the same normalisation, and group_norm
  keeps NHWC memory where instance_norm would copy to NCHW.

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


def pointwise_then_spatial(x: Tensor, pointwise: nn.Conv2d, spatial: nn.Conv2d) -> Tensor:
    """``spatial(pointwise(x))`` for a 1x1 conv followed by a (grouped) conv with zero padding.

    Computed as one conv of [x, ones] with the composed kernel (see the module docstring); other
    layer pairs run as they are. Shapes: (N, C, H, W) -> (N, O, H, W).
    """
    if pointwise.kernel_size != (1, 1) or spatial.padding_mode != "zeros":
        return spatial(pointwise(x))
    ones = x.new_ones((x.shape[0], 1, *x.shape[-2:]))
    stacked = torch.cat((x, ones), dim=1)  # (N, C + 1, H, W); zero-padded like pointwise(x) is
    kernel = composed_kernel(pointwise, spatial).to(x.dtype)
    return F.conv2d(
        stacked,
        kernel,
        spatial.bias,
        stride=spatial.stride,
        padding=spatial.padding,
        dilation=spatial.dilation,
    )


def instance_norm(x: Tensor, norm: nn.InstanceNorm2d) -> Tensor:
    """`norm(x)` for a stateless InstanceNorm2d, as a per-channel group norm that keeps NHWC memory."""
    if norm.affine or norm.track_running_stats:
        return norm(x)
    return F.group_norm(x, x.shape[1], eps=norm.eps)
