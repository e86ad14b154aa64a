"""Dense displacement fields: THE flow convention of bsafuse lives here.

A *flow* is a (N, 2, H, W) tensor of displacements in pixels; channel 0 is x (columns) and
channel 1 is y (rows). ``warp(image, flow)[..., y, x]`` samples ``image`` at
``(x + flow[:, 0, y, x], y + flow[:, 1, y, x])``, bilinearly, reading zeros outside the image.
A *grid* always holds absolute coordinates; the two are never mixed.

Pixel centres sit at integer coordinates 0..W-1 (``align_corners=True`` in grid_sample terms),
everywhere in the package: image warps, feature warps and flow resizing.

Sampling and flow arithmetic run in float32 even under autocast: bilinear weights and summed
displacements lose whole pixels in bf16.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from bsafuse._checks import check_same_size, check_shape


@functools.lru_cache(maxsize=64)
def _normalised_grid(height: int, width: int, device: torch.device) -> Tensor:
    """(1, H, W, 2) identity grid in grid_sample's [-1, 1] units (x first), cached per size.

    Built outside inference mode so the same cached tensor serves training and inference.
    """
    with torch.inference_mode(False):
        ys = torch.linspace(-1.0, 1.0, height, device=device) if height > 1 else torch.zeros(1, device=device)
        xs = torch.linspace(-1.0, 1.0, width, device=device) if width > 1 else torch.zeros(1, device=device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack((grid_x, grid_y), dim=-1)[None]  # (1, H, W, 2)


def pixel_grid(height: int, width: int, *, like: Tensor) -> Tensor:
    """(1, 2, H, W) grid holding every pixel's own (x, y) coordinate, in pixels."""
    ys, xs = torch.meshgrid(
        torch.arange(height, device=like.device, dtype=like.dtype),
        torch.arange(width, device=like.device, dtype=like.dtype),
        indexing="ij",
    )
    return torch.stack((xs, ys))[None]


def _pixels_to_unit(flow: Tensor) -> Tensor:
    """Scale a pixel flow (N, 2, H, W) into grid_sample units, channels last: (N, H, W, 2)."""
    h, w = flow.shape[-2:]
    scale = flow.new_tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])
    return flow.permute(0, 2, 3, 1) * scale


def warp(image: Tensor, flow: Tensor, *, mode: str = "bilinear", padding: str = "zeros") -> Tensor:
    """Resample `image` along `flow` (see the module docstring for the convention).

    Shapes: image (N, C, H, W), flow (N, 2, H, W) or (1, 2, H, W) -> (N, C, H, W).
    `padding` is grid_sample's padding mode: "zeros" for images, "border" for flows.
    """
    check_shape(image, "N C H W", name="image")
    check_shape(flow, "N 2 H W", name="flow")
    if image.shape[-2:] != flow.shape[-2:]:
        raise ValueError(
            f"image is {tuple(image.shape[-2:])} but flow is {tuple(flow.shape[-2:])}; "
            "resize the flow with resize_flow() first"
        )
    h, w = image.shape[-2:]
    with torch.autocast(device_type=image.device.type, enabled=False):
        coords = _normalised_grid(h, w, flow.device) + _pixels_to_unit(flow.float())
        out = F.grid_sample(image.float(), coords, mode=mode, padding_mode=padding, align_corners=True)
    return out.to(image.dtype)


def resize_flow(flow: Tensor, size: tuple[int, int], *, antialias: bool = False) -> Tensor:
    """Resize a flow to `size` = (H, W), either way, and rescale its vectors to the new pixel units.

    Shapes: (N, 2, h, w) -> (N, 2, H, W). With the align-corners pixel convention a displacement
    of d pixels on a grid of w pixels is d * (W - 1) / (w - 1) pixels on a grid of W. With
    `antialias`, a flow that shrinks in either dimension is low-pass filtered first (a mean of the
    displacements it covers, not a sample of one); growing is plain bilinear either way. The
    result is float32 unless the size is unchanged (then `flow` itself comes back).
    """
    check_shape(flow, "N 2 H W", name="flow")
    h, w = flow.shape[-2:]
    if (h, w) == tuple(size):
        return flow
    shrinks = size[0] < h or size[1] < w
    with torch.autocast(device_type=flow.device.type, enabled=False):
        out = F.interpolate(
            flow.float(), size=size, mode="bilinear", align_corners=True, antialias=antialias and shrinks
        )
        scale = out.new_tensor([(size[1] - 1) / max(w - 1, 1), (size[0] - 1) / max(h - 1, 1)])
        return out * scale.view(1, 2, 1, 1)


def compose_flows(first: Tensor, second: Tensor) -> Tensor:
    """The single flow equal to warping by `first`, then by `second`.

    ``warp(warp(x, first), second) ~= warp(x, compose_flows(first, second))``: the result at p is
    second(p) + first(p + second(p)). Shapes: (N, 2, H, W) each -> (N, 2, H, W).
    """
    check_same_size(first, second, names=("first", "second"))
    with torch.autocast(device_type=first.device.type, enabled=False):
        return second.float() + warp(first.float(), second.float(), padding="border")


def invert_flow(flow: Tensor, *, iterations: int = 30, tolerance: float = 1e-4) -> Tensor:
    """The flow g that undoes `flow`: ``warp(warp(x, flow), g) ~= x`` (fixed-point iteration).

    Solves g(p) = -flow(p + g(p)), which converges for fields whose Jacobian stays away from
    folding (|grad flow| < 1): at most `iterations` steps, fewer once a step moves no vector by
    `tolerance` pixels or more (the training deformations' elastic fields: 6-11 steps, after
    which float32 rounding, 1e-6 to 1e-5 px, is all that changes). Shapes: (N, 2, H, W) -> (N, 2, H, W).
    """
    check_shape(flow, "N 2 H W", name="flow")
    with torch.autocast(device_type=flow.device.type, enabled=False):
        flow = flow.float()
        inverse = -flow
        for _ in range(iterations):
            step = -warp(flow, inverse, padding="border")
            change = (step - inverse).abs().max().item() if step.numel() else 0.0
            inverse = step
            if change < tolerance:
                break
        return inverse


def jacobian_determinant(flow: Tensor) -> Tensor:
    """Determinant of the Jacobian of p -> p + flow(p), by central differences.

    Values <= 0 mark folded pixels. Shapes: (N, 2, H, W) -> (N, H, W).
    """
    check_shape(flow, "N 2 H W", name="flow")
    flow = flow.float()
    dux_dy, dux_dx = torch.gradient(flow[:, 0], dim=(1, 2))
    duy_dy, duy_dx = torch.gradient(flow[:, 1], dim=(1, 2))
    return (1 + dux_dx) * (1 + duy_dy) - dux_dy * duy_dx
