"""deform.py: seeded rigid + elastic deformations whose ground-truth flow undoes them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bsafuse.deform import NEAR_FACTOR, DeformParams, augment_pair, random_deformation, random_field
from bsafuse.warp import jacobian_determinant, pixel_grid, warp

STILL = DeformParams(rotate_deg=0, translate_px=0, scale=0, elastic_px=0)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    a, b = a[mask].double(), b[mask].double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def smooth_image(size: int = 64, channels: int = 1) -> torch.Tensor:
    """A smooth blob image with structure everywhere, (1, C, size, size) in [0, 1]."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    base = 0.5 + 0.25 * torch.sin(3 * xs + 1) * torch.cos(2 * ys) + 0.2 * torch.exp(-4 * (xs**2 + ys**2))
    return torch.stack([base * (0.6 + 0.2 * c) for c in range(channels)])[None]


@pytest.fixture(scope="module")
def ct_slice(harvard: Path) -> torch.Tensor:
    pixels = (
        np.asarray(Image.open(harvard / "CT-MRI" / "CT" / "16003.png").convert("L"), dtype=np.float32) / 255
    )
    return torch.from_numpy(pixels)[None, None]


# --- parameters -----------------------------------------------------------------------------


def test_defaults_match_the_spec() -> None:
    p = DeformParams()
    assert (p.rotate_deg, p.translate_px, p.scale, p.elastic_px) == (10, 10, 0.05, 4)
    assert not p.flip and not p.rot90
    assert DeformParams.training().flip and DeformParams.training().rot90


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rotate_deg": -1}, r"rotate_deg must be a finite number >= 0, got -1"),
        ({"translate_px": math.nan}, r"translate_px must be a finite number >= 0"),
        ({"rotate_deg": 60}, r"rotate_deg must be at most 45 degrees, got 60; .*pre-alignment"),
        ({"scale": 0.7}, r"scale must be at most 0.5, got 0.7"),
        ({"elastic_px": 9}, r"elastic_px \(9\) must be at most elastic_spacing_px / 4 \(8\)"),
        ({"elastic_spacing_px": 2, "elastic_px": 0}, r"elastic_spacing_px must be at least 4 pixels"),
    ],
)
def test_bad_params_are_refused_with_the_value(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DeformParams(**kwargs)


# --- fields ---------------------------------------------------------------------------------


def test_same_seed_same_field_other_seed_other_field() -> None:
    a = random_field((2, 48, 40), DeformParams(), seeded(7))
    b = random_field((2, 48, 40), DeformParams(), seeded(7))
    c = random_field((2, 48, 40), DeformParams(), seeded(8))
    assert a.shape == (2, 2, 48, 40) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])  # each sample gets its own draw


def test_random_field_is_the_field_random_deformation_applies() -> None:
    image = smooth_image(40)
    deformed, _ = random_deformation(image, params=DeformParams(), generator=seeded(3))
    field = random_field(image.shape, DeformParams(), seeded(3))
    assert torch.allclose(deformed, warp(image, field), atol=1e-6)


def test_zero_amplitudes_are_the_identity() -> None:
    image = smooth_image(32, channels=3)
    deformed, flow_true = random_deformation(image, params=STILL, generator=seeded(0))
    assert torch.equal(flow_true, torch.zeros_like(flow_true))
    assert torch.equal(random_field(image.shape, STILL, seeded(0)), torch.zeros(1, 2, 32, 32))
    assert torch.allclose(deformed, image, atol=1e-6)


@pytest.mark.parametrize(
    ("params", "bound"),
    [
        (DeformParams(rotate_deg=0, scale=0, elastic_px=0, translate_px=3), 3 * math.sqrt(2)),
        (DeformParams(rotate_deg=0, scale=0, translate_px=0, elastic_px=2.5), 2.5),
        # rotation about the centre: |R(p) - p| <= 2 sin(theta / 2) * distance to the corner
        (
            DeformParams(rotate_deg=8, scale=0, translate_px=0, elastic_px=0),
            2 * math.sin(math.radians(4)) * 31.5 * 2**0.5,
        ),
        (DeformParams(), DeformParams().max_displacement_px(64, 64)),
    ],
)
def test_magnitude_is_bounded_by_the_params(params: DeformParams, bound: float) -> None:
    field = random_field((16, 64, 64), params, seeded(1))
    largest = field.norm(dim=1).amax().item()
    assert largest <= bound + 1e-4
    assert largest > 0.3 * bound  # and the amplitudes are actually used
    if params.translate_px == 3 and params.elastic_px == 0:
        assert field.abs().amax().item() <= 3 + 1e-5  # per axis


def test_near_share_makes_that_share_of_draws_small_and_leaves_plain_seeds_alone() -> None:
    params = DeformParams(rotate_deg=4, translate_px=5, scale=0.04)
    plain = random_field((64, 48, 48), params, seeded(2))
    assert torch.equal(plain, random_field((64, 48, 48), DeformParams(**{**vars(params), "near_share": 0.0}), seeded(2)))
    bound = params.max_displacement_px(48, 48)
    everyone = random_field((64, 48, 48), DeformParams(**{**vars(params), "near_share": 1.0}), seeded(2))
    assert everyone.norm(dim=1).amax().item() <= NEAR_FACTOR * bound + 1e-4
    half = random_field((400, 48, 48), DeformParams(**{**vars(params), "near_share": 0.5}), seeded(3))
    mean = half.norm(dim=1).mean(dim=(1, 2))
    plain_mean = random_field((400, 48, 48), params, seeded(3)).norm(dim=1).mean(dim=(1, 2))
    assert mean.median() < 0.75 * plain_mean.median()  # half the draws are at most half as large
    with pytest.raises(ValueError, match=r"near_share must be a share in \[0, 1\], got 1.5"):
        DeformParams(near_share=1.5)


def test_fields_do_not_fold_at_the_largest_elastic_amplitude() -> None:
    params = DeformParams(elastic_px=8, elastic_spacing_px=32)
    for size in ((256, 256), (32, 32), (40, 64)):
        field = random_field((8, *size), params, seeded(2))
        assert jacobian_determinant(field).amin().item() > 0.2, size


def test_flow_true_inverts_the_applied_field() -> None:
    """flow_true(p) + u(p + flow_true(p)) = 0 wherever p + flow_true(p) lies in the image."""
    image = smooth_image(96)
    _, flow_true = random_deformation(image, params=DeformParams(), generator=seeded(4))
    applied = random_field(image.shape, DeformParams(), seeded(4))
    residual = (flow_true + warp(applied, flow_true, padding="border")).norm(dim=1)
    target = pixel_grid(96, 96, like=flow_true) + flow_true
    inside = ((target >= 1) & (target <= 94)).all(dim=1)
    assert inside.float().mean() > 0.5
    assert residual[inside].max().item() < 0.05


def test_rigid_flow_true_is_exact_beyond_the_border() -> None:
    """Without elastic part both fields are affine, so the inverse is checkable everywhere."""
    params = DeformParams(rotate_deg=10, translate_px=10, scale=0.05, elastic_px=0)
    _, flow_true = random_deformation(smooth_image(64), params=params, generator=seeded(5))
    applied = random_field((1, 64, 64), params, seeded(5))
    points = pixel_grid(64, 64, like=applied).reshape(2, -1).T.double()  # (HW, 2)
    design = torch.cat((points, torch.ones(len(points), 1, dtype=torch.float64)), dim=1)
    fit = torch.linalg.lstsq(design, applied.reshape(2, -1).T.double()).solution  # u = [p 1] @ fit
    assert (design @ fit - applied.reshape(2, -1).T).abs().max() < 1e-3  # affine indeed
    target = points + flow_true.reshape(2, -1).T.double()
    residual = flow_true.reshape(2, -1).T.double() + torch.cat((target, torch.ones(len(target), 1)), 1) @ fit
    assert residual.abs().max().item() < 1e-3  # also where flow_true points outside the image


def test_colour_channels_share_one_field() -> None:
    grey = smooth_image(48)
    colour = torch.cat((grey, 0.5 * grey, 1 - grey), dim=1)
    deformed_grey, flow_grey = random_deformation(grey, params=DeformParams(), generator=seeded(6))
    deformed, flow = random_deformation(colour, params=DeformParams(), generator=seeded(6))
    assert deformed.shape == (1, 3, 48, 48) and flow.shape == (1, 2, 48, 48)
    assert torch.equal(flow, flow_grey)
    assert torch.allclose(deformed[:, 0], deformed_grey[:, 0], atol=1e-6)
    assert torch.allclose(deformed[:, 1], 0.5 * deformed_grey[:, 0], atol=1e-6)
    valid = warp(torch.ones_like(grey), random_field(grey.shape, DeformParams(), seeded(6)))
    assert torch.allclose(deformed[:, 2], valid[:, 0] - deformed_grey[:, 0], atol=1e-5)


def test_output_follows_the_image_dtype_and_device() -> None:
    image = smooth_image(32).to(torch.float64)
    deformed, flow_true = random_deformation(image, params=DeformParams(), generator=seeded(0))
    assert deformed.dtype == torch.float64 and flow_true.dtype == torch.float32


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"image must have shape \(N, C, H, W\), got \(32, 32\)"):
        random_deformation(torch.zeros(32, 32), generator=seeded(0))
    with pytest.raises(ValueError, match=r"image must be a float tensor in \[0, 1\], got dtype torch.uint8"):
        random_deformation(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), generator=seeded(0))
    with pytest.raises(ValueError, match=r"shape must be \(N, H, W\) or \(N, C, H, W\), got \(8, 8\)"):
        random_field((8, 8), DeformParams(), seeded(0))


def test_real_ct_round_trip(ct_slice: torch.Tensor) -> None:
    """The issue's planted-answer test: warping the deformed CT by flow_true gives the CT back."""
    params = DeformParams(rotate_deg=10, translate_px=10, scale=0.05, elastic_px=4)
    deformed, flow_true = random_deformation(ct_slice, params=params, generator=seeded(0))
    restored = warp(deformed, flow_true)
    # Inside the head, where the deformed image holds data (the scanner table touches the image
    # border, and what the deformation pushed out of the frame cannot come back).
    head = ct_slice > 0.05
    mask = head & (warp(torch.ones_like(deformed), flow_true) > 0.999)
    assert mask.sum() > 0.95 * head.sum()
    assert flow_true.norm(dim=1).amax() > 10  # a strong deformation
    assert ncc(ct_slice, deformed, mask) < 0.9
    assert ncc(ct_slice, restored, mask) > 0.97


@pytest.mark.cuda
def test_cuda_matches_cpu_for_a_cpu_generator() -> None:
    image = smooth_image(64)
    cpu = random_deformation(image, params=DeformParams(), generator=seeded(9))
    gpu = random_deformation(image.cuda(), params=DeformParams(), generator=seeded(9))
    assert torch.allclose(gpu[1].cpu(), cpu[1], atol=1e-3)
    assert torch.allclose(gpu[0].cpu(), cpu[0], atol=1e-3)


# --- augmentation ---------------------------------------------------------------------------


def test_augment_pair_keeps_the_pair_aligned() -> None:
    fixed = torch.rand(12, 1, 16, 16, generator=seeded(0))
    moving = torch.cat((fixed, 2 * fixed, fixed**2), dim=1)  # a pixelwise function of fixed
    out_moving, out_fixed = augment_pair(moving, fixed, seeded(1))
    assert out_moving.shape == moving.shape and out_fixed.shape == fixed.shape
    assert torch.equal(out_moving, torch.cat((out_fixed, 2 * out_fixed, out_fixed**2), dim=1))
    changed = [not torch.equal(out_fixed[i], fixed[i]) for i in range(12)]
    assert 6 <= sum(changed) < 12  # per-sample draws, not one for the batch
    # each output is one of the 8 flips/rotations of its input
    for i in range(12):
        variants = [torch.rot90(x, k, dims=(-2, -1)) for x in (fixed[i], fixed[i].flip(-1)) for k in range(4)]
        assert any(torch.equal(out_fixed[i], v) for v in variants)


def test_augment_pair_same_seed_same_result_and_switches() -> None:
    moving, fixed = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    a = augment_pair(moving, fixed, seeded(3))
    b = augment_pair(moving, fixed, seeded(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    same = augment_pair(moving, fixed, seeded(3), flip=False, rot90=False)
    assert torch.equal(same[0], moving) and torch.equal(same[1], fixed)


def test_augment_pair_keeps_non_square_shapes() -> None:
    fixed = torch.rand(16, 1, 6, 10, generator=seeded(0))
    out_moving, out_fixed = augment_pair(fixed.clone(), fixed, seeded(2))
    assert out_fixed.shape == (16, 1, 6, 10) and torch.equal(out_moving, out_fixed)


def test_augment_pair_refuses_mismatched_images() -> None:
    with pytest.raises(ValueError, match=r"moving is \(1, 1, 8, 8\) but fixed is \(1, 1, 8, 9\)"):
        augment_pair(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9), seeded(0))
