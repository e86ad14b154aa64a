"""resample.py: moving images into the fixed image's physical grid (SimpleITK)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bsafuse.errors import InputError
from bsafuse.io import MedicalImage
from bsafuse.io.resample import resample_to


def ramp_volume(shape: tuple[int, int, int], spacing: tuple[float, float, float], origin=(0.0, 0.0, 0.0)):  # type: ignore[no-untyped-def]
    """Values linear in world x, so linear interpolation reproduces them exactly."""
    x = origin[0] + np.arange(shape[2]) * spacing[0]
    pixels = np.broadcast_to(x / 100.0, shape).astype(np.float32)
    return MedicalImage(pixels=pixels.copy(), spacing=spacing, origin=origin, path=Path("moving.nii.gz"))


def test_same_grid_is_identity() -> None:
    moving = MedicalImage(pixels=np.random.default_rng(0).random((3, 4, 5), dtype=np.float32))
    out = resample_to(moving, moving)
    np.testing.assert_allclose(out.pixels, moving.pixels, atol=1e-6)


def test_finer_fixed_grid_interpolates_linearly() -> None:
    moving = ramp_volume((4, 6, 10), (2.0, 2.0, 2.0))  # x from 0 to 18 mm
    fixed = MedicalImage(pixels=np.zeros((7, 11, 19), np.float32), spacing=(1.0, 1.0, 1.0))
    out = resample_to(moving, fixed)
    assert out.pixels.shape == (7, 11, 19) and out.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(out.pixels[3, 5], np.arange(19) / 100.0, atol=1e-6)
    assert out.path == moving.path  # moving's metadata, fixed's geometry


def test_origin_shift_moves_the_content() -> None:
    moving = MedicalImage(
        pixels=np.zeros((1, 8, 8), np.float32) + np.eye(8, dtype=np.float32), origin=(0.0, 0.0, 0.0)
    )
    fixed = MedicalImage(pixels=np.zeros((1, 8, 8), np.float32), origin=(2.0, 0.0, 0.0))  # 2 mm to the left
    out = resample_to(moving, fixed)
    np.testing.assert_allclose(out.pixels[0, 3, 1], 1.0)  # moving (x=3, y=3) is fixed (x=1, y=3)
    np.testing.assert_allclose(out.pixels[0, :, 6:], 0.0)  # outside the moving image: 0


def test_2d_slices_with_geometry_and_colour() -> None:
    rgb = np.random.default_rng(1).random((6, 6, 3), dtype=np.float32)
    moving = MedicalImage(pixels=rgb, is_colour=True, spacing=(2.0, 2.0, 1.0))
    fixed = MedicalImage(pixels=np.zeros((11, 11), np.float32), spacing=(1.0, 1.0, 1.0))
    out = resample_to(moving, fixed)
    assert out.is_colour and out.pixels.shape == (11, 11, 3)
    np.testing.assert_allclose(out.pixels[::2, ::2], rgb, atol=1e-6)
    np.testing.assert_allclose(out.pixels[1, 0], (rgb[0, 0] + rgb[1, 0]) / 2, atol=1e-6)


def test_volume_into_a_2d_slice() -> None:
    moving = ramp_volume((5, 4, 4), (1.0, 1.0, 1.0))
    fixed = MedicalImage(pixels=np.zeros((4, 4), np.float32), origin=(0.0, 0.0, 2.0))
    out = resample_to(moving, fixed)
    assert out.pixels.shape == (4, 4) and not out.is_volume
    np.testing.assert_allclose(out.pixels, moving.pixels[2], atol=1e-6)


def test_no_overlap_names_both_files() -> None:
    moving = ramp_volume((2, 4, 4), (1.0, 1.0, 1.0))
    fixed = MedicalImage(
        pixels=np.zeros((2, 4, 4), np.float32), origin=(500.0, 0.0, 0.0), path=Path("fixed.dcm")
    )
    with pytest.raises(InputError, match=r"moving\.nii\.gz and fixed\.dcm do not overlap"):
        resample_to(moving, fixed)
