"""warp.py: the flow convention, pinned by planted answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import bsafuse.warp as warp_module
from bsafuse.warp import (
    compose_flows,
    invert_flow,
    jacobian_determinant,
    pixel_grid,
    resize_flow,
    warp,
)


def smooth_flow(generator: torch.Generator, size: int = 64, amplitude: float = 2.0) -> torch.Tensor:
    """A smooth random field, |Jacobian - 1| well below 1 (no folds)."""
    coarse = torch.rand(1, 2, 4, 4, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True) * amplitude


def test_zero_flow_is_identity(generator: torch.Generator) -> None:
    image = torch.rand(2, 3, 17, 23, generator=generator)
    assert torch.allclose(warp(image, torch.zeros(2, 2, 17, 23)), image, atol=1e-6)


@pytest.mark.parametrize(("dx", "dy"), [(3, 0), (0, -2), (4, 5), (-6, 1)])
def test_integer_shift_moves_a_dot_exactly(dx: int, dy: int) -> None:
    image = torch.zeros(1, 1, 20, 20)
    image[0, 0, 10, 10] = 1.0
    flow = torch.zeros(1, 2, 20, 20)
    flow[:, 0], flow[:, 1] = dx, dy  # every pixel samples (x + dx, y + dy)
    out = warp(image, flow)
    assert out[0, 0, 10 - dy, 10 - dx].item() == pytest.approx(1.0, abs=1e-5)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_flow_channel0_is_x() -> None:
    image = torch.zeros(1, 1, 5, 5)
    image[0, 0, 2, 2] = 1.0
    flow = torch.zeros(1, 2, 5, 5)
    flow[:, 0] = 1.0  # every pixel samples its right-hand neighbour
    out = warp(image, flow)
    assert out[0, 0, 2, 1].item() == pytest.approx(1.0) and out.sum().item() == pytest.approx(1.0)


def test_samples_outside_read_zero() -> None:
    flow = torch.zeros(1, 2, 8, 8)
    flow[:, 0] = 100.0
    assert warp(torch.ones(1, 1, 8, 8), flow).abs().max().item() == 0.0


def test_flow_channels_last_is_refused() -> None:
    with pytest.raises(ValueError, match=r"flow must have shape \(N, 2, H, W\), got \(1, 5, 5, 2\)"):
        warp(torch.zeros(1, 1, 5, 5), torch.zeros(1, 5, 5, 2))


def test_size_mismatch_names_both_sizes() -> None:
    with pytest.raises(ValueError, match=r"image is \(8, 8\) but flow is \(4, 4\)"):
        warp(torch.zeros(1, 1, 8, 8), torch.zeros(1, 2, 4, 4))


def test_pixel_grid_holds_coordinates() -> None:
    grid = pixel_grid(3, 4, like=torch.zeros(1))
    assert grid.shape == (1, 2, 3, 4)
    assert grid[0, 0, 2, 3].item() == 3 and grid[0, 1, 2, 3].item() == 2


def test_resize_flow_rescales_vectors() -> None:
    flow = torch.full((1, 2, 16, 16), 1.5)
    up = resize_flow(flow, (31, 31))  # (31 - 1) / (16 - 1) = 2 pixels per coarse pixel
    assert up.shape == (1, 2, 31, 31)
    assert torch.allclose(up, torch.full_like(up, 3.0))
    down = resize_flow(up, (16, 16), antialias=True)  # and back: 1 / 2 pixel per fine pixel
    assert down.shape == (1, 2, 16, 16) and torch.allclose(down, flow)
    assert resize_flow(flow, (16, 16)) is flow  # same size: the flow itself


def test_resize_flow_antialias_averages_only_when_shrinking(generator: torch.Generator) -> None:
    flow = torch.zeros(1, 2, 32, 32)
    flow[..., ::2] = 1.0  # stripes one pixel wide: a plain resize samples them, a filter averages
    plain, filtered = resize_flow(flow, (8, 8)), resize_flow(flow, (8, 8), antialias=True)
    assert (plain.amax() - plain.amin()).item() > 0.1
    assert (filtered.amax() - filtered.amin()).item() < (plain.amax() - plain.amin()).item() / 2
    coarse = torch.rand(1, 2, 5, 5, generator=generator)
    assert torch.equal(resize_flow(coarse, (17, 17), antialias=True), resize_flow(coarse, (17, 17)))


def test_upsampled_shift_still_moves_a_dot_by_the_right_amount() -> None:
    coarse = torch.zeros(1, 2, 9, 9)
    coarse[:, 0] = 1.0  # one coarse pixel = (33 - 1) / (9 - 1) = 4 fine pixels
    image = torch.zeros(1, 1, 33, 33)
    image[0, 0, 16, 16] = 1.0
    out = warp(image, resize_flow(coarse, (33, 33)))
    assert out[0, 0, 16, 12].item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compose_equals_sequential_warps(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    first, second = smooth_flow(gen), smooth_flow(gen)
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    image = (0.5 + 0.5 * torch.sin(xs / 6) * torch.cos(ys / 7))[None, None]  # smooth, in [0, 1]
    sequential = warp(warp(image, first), second)
    once = warp(image, compose_flows(first, second))
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))  # away from the zero border
    assert (sequential - once)[inner].abs().max().item() < 0.01


@pytest.mark.parametrize("seed", [0, 1])
def test_invert_twice_gives_back_the_flow(seed: int) -> None:
    flow = smooth_flow(torch.Generator().manual_seed(seed), amplitude=3.0)
    back = invert_flow(invert_flow(flow))
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    assert (back - flow)[inner].abs().max().item() < 0.03


def test_inverse_undoes_the_warp(generator: torch.Generator) -> None:
    flow = smooth_flow(generator, amplitude=3.0)
    composed = compose_flows(flow, invert_flow(flow))
    assert composed[..., 4:-4, 4:-4].abs().max().item() < 0.05


def test_inverse_stops_once_converged_within_its_tolerance(
    generator: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    flow = smooth_flow(generator, amplitude=3.0)
    full = invert_flow(flow, tolerance=0.0)  # all 30 steps
    steps = []
    plain_warp = warp_module.warp
    monkeypatch.setattr(warp_module, "warp", lambda *a, **k: steps.append(1) or plain_warp(*a, **k))
    early = invert_flow(flow)
    assert 3 <= len(steps) < 20
    assert (early - full).abs().max().item() < 1e-3  # a few times the 1e-4 px of the last step
    assert invert_flow(torch.zeros(1, 2, 5, 5)).abs().max().item() == 0.0


def test_jacobian_of_identity_and_scaling() -> None:
    assert torch.allclose(jacobian_determinant(torch.zeros(2, 2, 8, 8)), torch.ones(2, 8, 8))
    grid = pixel_grid(8, 8, like=torch.zeros(1))
    doubled = grid.clone()  # p -> 2p, so flow = p and det = 4
    assert torch.allclose(jacobian_determinant(doubled), torch.full((1, 8, 8), 4.0))


def test_jacobian_flags_a_fold() -> None:
    grid = pixel_grid(8, 8, like=torch.zeros(1))
    flip_x = torch.zeros(1, 2, 8, 8)
    flip_x[:, 0] = -2 * grid[:, 0]  # p_x -> -p_x: orientation reversed everywhere
    assert (jacobian_determinant(flip_x) < 0).all()


def test_gradients_flow_through_warp(generator: torch.Generator) -> None:
    image = torch.rand(1, 1, 6, 6, generator=generator, dtype=torch.float64)
    flow = (torch.rand(1, 2, 6, 6, generator=generator, dtype=torch.float64) - 0.5).requires_grad_()
    out = warp(image, flow)
    out.sum().backward()
    assert flow.grad is not None and math.isfinite(flow.grad.abs().sum().item())


def test_warp_keeps_dtype_and_cached_grid_survives_inference_mode(generator: torch.Generator) -> None:
    image = torch.rand(1, 1, 12, 12, generator=generator)
    with torch.inference_mode():
        warp(image, torch.zeros(1, 2, 12, 12))
    flow = torch.zeros(1, 2, 12, 12, requires_grad=True)
    out = warp(image, flow)
    out.mean().backward()
    assert out.dtype == image.dtype and flow.grad is not None
