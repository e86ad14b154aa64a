"""The one data path (bsafuse.working_size): training and inference prepare a pair identically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bsafuse import api, data
from bsafuse.io import read_image
from bsafuse.warp import warp
from bsafuse.working_size import keep_fixed_outside, placement, split_luma


def _pair_folder(root: Path, shape: tuple[int, int]) -> Path:
    """One colour PET + grey MRI pair of a non-square size, with structure in both."""
    rng = np.random.default_rng(3)
    h, w = shape
    (root / "MRI").mkdir(parents=True)
    (root / "PET").mkdir()
    yy, xx = np.mgrid[:h, :w]
    mri = (127 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).astype(np.uint8)
    pet = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(mri, "L").save(root / "MRI" / "16003.png")
    Image.fromarray(pet, "RGB").save(root / "PET" / "16003.png")
    return root


@pytest.mark.parametrize("shape", [(100, 70), (40, 56)])  # shrunk to 64 px, and enlarged
def test_training_and_inference_feed_the_network_the_same_pixels(
    tmp_path: Path, tiny_model: torch.nn.Module, shape: tuple[int, int]
) -> None:
    root = _pair_folder(tmp_path, shape)
    size = tiny_model.config.image_size
    moving_dir, fixed_dir = data.find_pair_folder(root)
    training = data.load_pairs(moving_dir, fixed_dir, ["16003"], image_size=size)

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = tiny_model.register_forward_pre_hook(lambda m, args: seen.append((args[0].clone(), args[1].clone())))
    try:
        api.fuse(read_image(moving_dir / "16003.png"), read_image(fixed_dir / "16003.png"), tiny_model, prealign="none")
    finally:
        handle.remove()
    moving_in, fixed_in = seen[0]
    torch.testing.assert_close(moving_in, training.moving, atol=1e-6, rtol=0)
    torch.testing.assert_close(fixed_in, training.fixed, atol=1e-6, rtol=0)


def test_outputs_come_back_to_the_input_grid_with_flow_in_its_pixels() -> None:
    place = placement(50, 100, 32)  # padded to 100 x 100, shrunk to 32
    assert place.padding == (0, 0, 25, 25)
    shift = torch.zeros(1, 2, 32, 32)
    shift[:, 0] = 3.1  # 3.1 working pixels = 3.1 * 99 / 31 output pixels to the right
    flow = place.flow_back(shift)
    assert flow.shape == (1, 2, 50, 100)
    torch.testing.assert_close(flow[:, 0], torch.full((1, 50, 100), 3.1 * 99 / 31))
    assert float(flow[:, 1].abs().max()) == 0.0
    ones = place.image_back(torch.ones(1, 1, 32, 32))
    assert ones.shape == (1, 1, 50, 100) and torch.allclose(ones, torch.ones_like(ones))


def test_split_luma_is_bt601_y_and_leaves_grey_alone() -> None:
    rgb = np.zeros((2, 2, 3), np.float32)
    rgb[0, 0] = (1.0, 0.0, 0.0)
    rgb[1, 1] = (0.0, 0.0, 1.0)
    y, ycc = split_luma(rgb, colour=True)
    assert ycc is not None and y.shape == (2, 2)
    np.testing.assert_allclose(y, [[0.299, 0.0], [0.0, 0.114]], atol=1e-6)
    grey = np.full((3, 3), 0.25, np.float32)
    same, none = split_luma(grey, colour=False)  # a 3-pixel-wide grey slice
    assert same is grey and none is None


def test_border_rule_keeps_the_fixed_image_where_the_moving_one_has_no_data() -> None:
    fixed = torch.full((1, 1, 8, 8), 0.3)
    fused = torch.full((1, 1, 8, 8), 0.9)
    flow = torch.zeros(1, 2, 8, 8)
    flow[:, 0] = 20.0  # every pixel samples far outside the moving image
    out, valid = keep_fixed_outside(fused, fixed, flow)
    assert float(valid.max()) == 0.0
    torch.testing.assert_close(out, fixed)
    out, valid = keep_fixed_outside(fused, fixed, torch.zeros(1, 2, 8, 8))
    torch.testing.assert_close(out, fused)
    assert torch.equal(warp(torch.ones(1, 1, 8, 8), torch.zeros(1, 2, 8, 8)), valid)
