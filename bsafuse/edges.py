"""Sobel edges of (N, C, H, W) image tensors, in float32: for L_grad (losses) and the metric terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def fp32_scope(device: torch.device) -> torch.autocast:
    """Autocast off on `device`: inside it, float32 inputs stay float32 (SSIM, Sobel, reductions)."""
    return torch.autocast(device_type=device.type, enabled=False)


def sobel_xy(image: Tensor) -> Tensor:
    """(d/dx, d/dy) by 3x3 Sobel kernels, edges replicated (no false edge at the border).

    Shapes: (N, C, H, W) -> (N, C, 2, H, W), float32.
    """
    with fp32_scope(image.device):
        image = image.float()
        c = image.shape[1]
        kx = image.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        kernels = torch.stack((kx, kx.T)).unsqueeze(1).repeat(c, 1, 1, 1)  # (2C, 1, 3, 3)
        padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
        g = F.conv2d(padded, kernels, groups=c)  # (N, 2C, H, W): gx, gy per channel
        return g.unflatten(1, (c, 2))


def sobel(image: Tensor) -> Tensor:
    """|d/dx| + |d/dy| of `sobel_xy`. Shapes: (N, C, H, W) -> (N, C, H, W), float32."""
    return sobel_xy(image).abs().sum(dim=2)
