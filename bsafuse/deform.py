"""Random misalignments with a known answer: rigid + elastic deformations (design.md §4).

Convention (the flow convention itself lives in warp.py):

- The *applied* field ``u`` deforms the image: ``deformed = warp(image, u)``, that is
  ``deformed(p) = image(T(p))`` with ``T(p) = p + u(p)``.
- ``T = E o R``: a rigid part ``R(p) = A (p - c) + c + t`` (rotation by ``theta``, isotropic scale
  ``s``, translation ``t``, about the image centre ``c = ((W - 1) / 2, (H - 1) / 2)``) followed by an
  elastic part ``E(q) = q + e(q)``: ``T(p) = R(p) + e(R(p))``.
- The *ground-truth registration flow* ``flow_true`` undoes it: ``warp(deformed, flow_true) ~= image``,
  i.e. ``flow_true(p) = T^-1(p) - p = R^-1(E^-1(p)) - p``. The rigid inverse is exact; ``E^-1`` comes
  from :func:`bsafuse.warp.invert_flow` (fixed-point iteration, design.md §4). This is the flow a
  registration method should output with the deformed image as *moving* and the original as *fixed*.

The elastic field ``e`` is drawn on a canvas larger than the image (so ``e(R(p))`` and ``E^-1`` are
defined where the rigid part looks outside the image): random vectors, uniform in a disc, on a coarse
control grid with ``elastic_spacing_px`` between points, upsampled bicubically (a smooth C1 field),
then rescaled so its largest vector is ``a ~ U(0, elastic_px)`` pixels. Rigid draws: ``theta ~
U(-rotate_deg, rotate_deg)``, ``t ~ U(-translate_px, translate_px)`` per axis, ``s ~ U(1 - scale,
1 + scale)``. Each sample of a batch gets its own draw; colour channels share their sample's field.
With ``near_share > 0`` that share of the draws is made nearly aligned: all of its amplitudes (angle,
shift, scale offset, elastic field) are multiplied by one factor ``k ~ U(0, NEAR_FACTOR)``.

All randomness comes from the ``torch.Generator`` passed in (drawn on the generator's device, then
moved), so the same seed gives the same field on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from bsafuse._checks import check_shape
from bsafuse.warp import invert_flow, pixel_grid, warp

MAX_ROTATE_DEG = 45.0  # degrees; beyond this, rigid pre-alignment is the tool (design.md §2a)
MAX_SCALE = 0.5  # |s - 1|
NEAR_FACTOR = 0.5  # a nearly aligned draw (DeformParams.near_share) has at most half the amplitudes


@dataclass(frozen=True)
class DeformParams:
    """Amplitudes of a random deformation; every one is an upper bound of a uniform draw.

    Defaults cover the authors' training deformations (about 1 px translation plus a few pixels of
    elastic warping, no rotation) and more, as design.md §2a asks.
    """

    rotate_deg: float = 10.0  # degrees, |theta| <= rotate_deg
    translate_px: float = 10.0  # pixels, per axis
    scale: float = 0.05  # |s - 1| <= scale (isotropic)
    elastic_px: float = 4.0  # pixels, largest elastic displacement
    elastic_spacing_px: float = 32.0  # pixels between elastic control points
    flip: bool = False  # augment_pair: random horizontal flip of both images
    rot90: bool = False  # augment_pair: random multiple of 90 degrees, both images
    # Share of draws made nearly aligned: every amplitude of such a draw is multiplied by one
    # U(0, NEAR_FACTOR) factor (rotation, shift, scale and elastic together), so a network trained
    # on the mixture also sees pairs that need little or no correction (design.md §4).
    near_share: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rotate_deg", "translate_px", "scale", "elastic_px", "elastic_spacing_px"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"DeformParams.{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.near_share, (int, float)) and 0 <= self.near_share <= 1):
            raise ValueError(f"DeformParams.near_share must be a share in [0, 1], got {self.near_share!r}")
        if self.rotate_deg > MAX_ROTATE_DEG:
            raise ValueError(
                f"DeformParams.rotate_deg must be at most {MAX_ROTATE_DEG:g} degrees, got {self.rotate_deg:g}; "
                "larger rotations are a job for rigid pre-alignment"
            )
        if self.scale > MAX_SCALE:
            raise ValueError(f"DeformParams.scale must be at most {MAX_SCALE:g}, got {self.scale:g}")
        if self.elastic_spacing_px < 4:
            raise ValueError(
                f"DeformParams.elastic_spacing_px must be at least 4 pixels, got {self.elastic_spacing_px:g}"
            )
        if self.elastic_px > self.elastic_spacing_px / 4:
            # Keeps |grad e| well below 1: no folding, and invert_flow converges.
            raise ValueError(
                f"DeformParams.elastic_px ({self.elastic_px:g}) must be at most elastic_spacing_px / 4 "
                f"({self.elastic_spacing_px / 4:g}) so the elastic field cannot fold; "
                "raise elastic_spacing_px for larger elastic displacements"
            )

    def scaled_by(self, factor: float) -> DeformParams:
        """These amplitudes (rotation, shift, scale offset, elastic) times `factor` in [0, 1]."""
        if not 0 <= factor <= 1:
            raise ValueError(f"DeformParams.scaled_by takes a factor in [0, 1], got {factor!r}")
        return replace(
            self,
            rotate_deg=self.rotate_deg * factor,
            translate_px=self.translate_px * factor,
            scale=self.scale * factor,
            elastic_px=self.elastic_px * factor,
        )

    @classmethod
    def training(cls) -> DeformParams:
        """The defaults plus flip and 90-degree rotation augmentation (for training data)."""
        return cls(flip=True, rot90=True)

    def max_rigid_px(self, height: int, width: int) -> float:
        """Upper bound of |R(p) - p| over an image of this size, in pixels."""
        radius = math.hypot((width - 1) / 2, (height - 1) / 2)
        linear = 2 * math.sin(math.radians(self.rotate_deg) / 2) * (1 + self.scale) + self.scale
        return linear * radius + math.sqrt(2) * self.translate_px

    def max_displacement_px(self, height: int, width: int) -> float:
        """Upper bound of |applied flow| (and of |flow_true| up to the elastic inversion), in pixels."""
        return self.max_rigid_px(height, width) + self.elastic_px


class _Fields(NamedTuple):
    applied: Tensor  # (N, 2, H, W): deformed = warp(image, applied)
    true: Tensor  # (N, 2, H, W): warp(deformed, true) ~= image


def _image_size(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise ValueError(f"shape must be (N, H, W) or (N, C, H, W), got {tuple(shape)}")
    return shape[0], shape[-2], shape[-1]


def _uniform(n: int, bound: float, generator: torch.Generator) -> Tensor:
    """(n,) float64 draws, uniform in [-bound, bound], from `generator` on its own device."""
    return (torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64) * 2 - 1) * bound


def _elastic_canvas(
    n: int, height: int, width: int, params: DeformParams, generator: torch.Generator
) -> Tensor:
    """(n, 2, height, width) float64 smooth field whose largest vector is U(0, elastic_px) pixels."""
    # Control points at least elastic_spacing_px apart (the bound on |grad e| relies on it).
    rows = max(2, math.floor((height - 1) / params.elastic_spacing_px) + 1)
    cols = max(2, math.floor((width - 1) / params.elastic_spacing_px) + 1)
    g_dev = generator.device
    angle = torch.rand(n, 1, rows, cols, generator=generator, device=g_dev, dtype=torch.float64) * (
        2 * math.pi
    )
    radius = torch.rand(n, 1, rows, cols, generator=generator, device=g_dev, dtype=torch.float64).sqrt()
    peak = torch.rand(n, generator=generator, device=g_dev, dtype=torch.float64) * params.elastic_px
    control = torch.cat((radius * angle.cos(), radius * angle.sin()), dim=1)  # (n, 2, rows, cols), |v| <= 1
    field = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True)
    # |v| from the two planes: norm(dim=1) over NCHW memory took 11 ms a 270 x 270 field (a slow path)
    largest = (field[:, 0].square() + field[:, 1].square()).sqrt().amax(dim=(1, 2)).clamp_min(1e-12)
    return field * (peak / largest).view(n, 1, 1, 1)


def _amplitude_factors(n: int, params: DeformParams, generator: torch.Generator) -> Tensor:
    """(n,) float64: 1, or for a share `near_share` of the draws U(0, NEAR_FACTOR).

    Draws nothing when near_share is 0, so seeds of plain deformations keep their fields.
    """
    ones = torch.ones(n, dtype=torch.float64, device=generator.device)
    if params.near_share == 0:
        return ones
    near = (
        torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64) < params.near_share
    )
    factor = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64) * NEAR_FACTOR
    return torch.where(near, factor, ones)


def _draw_rigid(
    n: int, params: DeformParams, generator: torch.Generator, factor: Tensor
) -> tuple[Tensor, Tensor]:
    """(A, t): (n, 2, 2) float64 rotation-and-scale matrices and (n, 2) float64 shifts (x, y)."""
    theta = torch.deg2rad(_uniform(n, params.rotate_deg, generator)) * factor
    scale = 1 + _uniform(n, params.scale, generator) * factor
    shift = torch.stack([_uniform(n, params.translate_px, generator) for _ in range(2)], dim=1)
    shift = shift * factor.view(n, 1)
    cos, sin = theta.cos() * scale, theta.sin() * scale
    matrix = torch.stack((torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), -2)
    return matrix, shift


def _affine_field(
    matrix: Tensor, offset: Tensor, *, size: tuple[int, int], origin: int, centre: Tensor
) -> Tensor:
    """(n, 2, *size) float32 field (A - I)(p - c) + offset, where p = grid pixel - origin.

    Computed in displacement form (float64), so A = I and offset = 0 give exactly zero.
    """
    points = pixel_grid(*size, like=matrix) - origin  # (1, 2, *size), float64
    eye = torch.eye(2, dtype=matrix.dtype, device=matrix.device)
    linear = torch.einsum("nij,bjhw->nihw", matrix - eye, points - centre.view(1, 2, 1, 1))
    return (linear + offset.view(-1, 2, 1, 1)).float()


def _fields(
    shape: tuple[int, ...],
    params: DeformParams,
    generator: torch.Generator,
    device: torch.device | str | None,
) -> _Fields:
    n, h, w = _image_size(shape)
    device = torch.device(device) if device is not None else generator.device
    margin = math.ceil(params.max_rigid_px(h, w)) + 2  # canvas border: R(p) stays on the canvas
    # Fixed draw order (amplitude factors, rigid, elastic), so a seed always means the same deformation.
    factor = _amplitude_factors(n, params, generator)
    matrix, shift = _draw_rigid(n, params, generator, factor)
    elastic = _elastic_canvas(n, h + 2 * margin, w + 2 * margin, params, generator)
    elastic = (elastic * factor.view(n, 1, 1, 1)).to(device).float()
    inverse = torch.linalg.inv(matrix)
    matrix, inverse, shift = matrix.to(device), inverse.to(device), shift.to(device)
    centre = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=torch.float64, device=device)

    canvas = (h + 2 * margin, w + 2 * margin)
    rigid = _affine_field(matrix, shift, size=canvas, origin=margin, centre=centre)  # R(p) - p
    crop = (..., slice(margin, margin + h), slice(margin, margin + w))
    if params.elastic_px == 0:
        applied, elastic_inverse = rigid[crop], torch.zeros(n, 2, h, w, device=device)
    else:
        applied = rigid[crop] + warp(elastic, rigid, padding="border")[crop]  # R(p) - p + e(R(p))
        # E^-1(p) - p; E^-1 looks at most elastic_px beyond the image, so invert on a tighter canvas.
        pad = min(margin, math.ceil(params.elastic_px) + 2)
        near = elastic[..., margin - pad : margin + h + pad, margin - pad : margin + w + pad]
        elastic_inverse = invert_flow(near)[..., pad : pad + h, pad : pad + w]
    # T^-1(p) - p = R^-1(q) - p with q = p + e_inv(p): (A^-1 - I)(p - c) + A^-1 (e_inv(p) - t).
    true = _affine_field(inverse, torch.zeros_like(shift), size=(h, w), origin=0, centre=centre)
    true = true + torch.einsum(
        "nij,njhw->nihw", inverse.float(), elastic_inverse - shift.float().view(n, 2, 1, 1)
    )
    return _Fields(applied=applied, true=true)


def random_field(
    shape: tuple[int, ...],
    params: DeformParams,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Tensor:
    """The applied displacement ``u`` of a random deformation: ``deformed = warp(image, u)``.

    Shapes: `shape` is (N, H, W) or an image's (N, C, H, W) -> (N, 2, H, W) float32 on `device`
    (default: the generator's device). :func:`random_deformation` with the same generator state
    applies exactly this field.
    """
    return _fields(tuple(shape), params, generator, device).applied


def random_deformation(
    image: Tensor, *, params: DeformParams | None = None, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Deform `image` at random; return ``(deformed, flow_true)`` with ``warp(deformed, flow_true) ~= image``.

    Shapes: image (N, C, H, W) float, C = 1 or 3 (one field per sample, shared by its channels)
    -> deformed (N, C, H, W) in the image's dtype (zeros where it samples outside the image) and
    flow_true (N, 2, H, W) float32 in pixels, both on the image's device.

    Example::

        g = torch.Generator().manual_seed(0)
        deformed, flow_true = random_deformation(image, params=DeformParams(rotate_deg=5), generator=g)
    """
    check_shape(image, "N C H W", name="image")
    if not image.is_floating_point():
        raise ValueError(f"image must be a float tensor in [0, 1], got dtype {image.dtype}")
    fields = _fields(tuple(image.shape), params or DeformParams(), generator, image.device)
    return warp(image, fields.applied), fields.true


def augment_pair(
    moving: Tensor, fixed: Tensor, generator: torch.Generator, *, flip: bool = True, rot90: bool = True
) -> tuple[Tensor, Tensor]:
    """Apply the same random horizontal flip and multiple-of-90-degree rotation to both images.

    Each sample of the batch gets its own draw (the pair stays aligned). Images that are not square
    keep their shape: they are rotated by 0 or 180 degrees only. Nothing is interpolated.
    Shapes: moving (N, Cm, H, W), fixed (N, Cf, H, W) -> the same shapes.
    """
    check_shape(moving, "N C H W", name="moving")
    check_shape(fixed, "N C H W", name="fixed")
    if moving.shape[0] != fixed.shape[0] or moving.shape[-2:] != fixed.shape[-2:]:
        raise ValueError(
            f"moving is {tuple(moving.shape)} but fixed is {tuple(fixed.shape)}; "
            "augment_pair needs the same batch size, height and width"
        )
    n, square = moving.shape[0], moving.shape[-1] == moving.shape[-2]
    flips = torch.rand(n, generator=generator, device=generator.device) < 0.5
    turns = torch.randint(0, 4, (n,), generator=generator, device=generator.device)
    if not square:
        turns = turns - turns % 2  # 0 or 2 quarter turns keep H x W
    pairs = []
    for i in range(n):
        m, f = moving[i : i + 1], fixed[i : i + 1]
        if flip and bool(flips[i]):
            m, f = m.flip(-1), f.flip(-1)
        k = int(turns[i]) if rot90 else 0
        if k:
            m, f = torch.rot90(m, k, dims=(-2, -1)), torch.rot90(f, k, dims=(-2, -1))
        pairs.append((m, f))
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
