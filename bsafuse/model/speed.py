"""The fast path of the network: exact rewrites of the plain transcription, and the switch to compare.

Every rewrite here computes the same function as the plain code it replaces (up to float rounding,
checked within 1e-4 on whole-network outputs and gradients by tests/test_perf_equivalence.py); the
parameters, their names and the checkpoints are unchanged, so training works on either path.

- *Composed 1x1 -> 3x3 convolutions.* Each Restormer branch is a 1x1 conv (C -> M) followed by a
  grouped 3x3 conv (M -> M). Both are linear, so they are one 3x3 conv C -> M whose kernel is the
  product of the two. For the gated feed-forward (M = 2 * 4C, two groups of 4C inputs) that is 4x
  fewer multiply-adds (the network's heaviest layers, at full resolution). The 1x1 conv's bias
  would be zero-padded at the image border by the 3x3 conv: it rides along as an extra all-ones
  input channel, which the 3x3 conv pads with zeros just the same, so borders stay exact.
- *1x1 conv before the x2 resize.* A 1x1 conv commutes with bilinear resizing (whose weights sum
  to 1), so the feature and state up-modules run it at the low resolution: 4x fewer multiply-adds.
- *channels_last.* Convolutions, the channel LayerNorm and bilinear resizes run on NHWC memory
  without layout round trips (oneDNN's native layout on CPUs, tensor cores' on GPUs).

``with reference_path():`` switches every rewrite off (the plain transcription runs), for the
equivalence tests and the before/after benchmarks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_FAST: ContextVar[bool] = ContextVar("bsafuse_fast_path", default=True)


def fast_path() -> bool:
    """Whether the rewrites of this module are on (the default)."""
    return _FAST.get()


@contextlib.contextmanager
def reference_path() -> Iterator[None]:
    """Run the plain transcription of the network inside this block (tests and benchmarks)."""
    token = _FAST.set(False)
    try:
        yield
    finally:
        _FAST.reset(token)


def channels_last(x: Tensor) -> Tensor:
    """`x` in channels_last memory on the fast path (a no-op when it already is), as is otherwise."""
    if not fast_path() or x.ndim != 4:
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

    On the fast path: one conv of [x, ones] with the composed kernel (see the module docstring).
    Shapes: (N, C, H, W) -> (N, O, H, W).
    """
    if not fast_path() or pointwise.kernel_size != (1, 1) or spatial.padding_mode != "zeros":
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
    if not fast_path() or norm.affine or norm.track_running_stats:
        return norm(x)
    return F.group_norm(x, x.shape[1], eps=norm.eps)
