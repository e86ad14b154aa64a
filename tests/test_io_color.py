"""color.py: exact BT.601 full-range RGB <-> YCbCr."""

from __future__ import annotations

import numpy as np
import pytest

from bsafuse.io.color import rgb_to_ycbcr, ycbcr_to_rgb


def test_round_trip_within_1e6() -> None:
    rgb = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    back = ycbcr_to_rgb(rgb_to_ycbcr(rgb))
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, rgb, atol=1e-6)


def test_greys_stay_grey() -> None:
    grey = np.repeat(np.linspace(0, 1, 11, dtype=np.float32)[:, None, None], 3, axis=2)  # (11, 1, 3)
    ycbcr = rgb_to_ycbcr(grey)
    np.testing.assert_allclose(ycbcr[..., 0], grey[..., 0], atol=1e-7)  # Y is the grey level
    np.testing.assert_allclose(ycbcr[..., 1:], 0.5, atol=1e-7)  # no chroma
    np.testing.assert_allclose(ycbcr_to_rgb(ycbcr), grey, atol=1e-7)


@pytest.mark.parametrize(
    ("rgb", "ycbcr"),
    [
        ((1.0, 0.0, 0.0), (0.299, 0.5 - 0.299 / 1.772, 1.0)),  # JPEG/JFIF values
        ((0.0, 1.0, 0.0), (0.587, 0.5 - 0.587 / 1.772, 0.5 - 0.587 / 1.402)),
        ((0.0, 0.0, 1.0), (0.114, 1.0, 0.5 - 0.114 / 1.402)),
    ],
)
def test_primaries(rgb: tuple[float, ...], ycbcr: tuple[float, ...]) -> None:
    np.testing.assert_allclose(rgb_to_ycbcr(np.array(rgb)), ycbcr, atol=1e-12)


def test_float64_and_integer_inputs() -> None:
    assert rgb_to_ycbcr(np.zeros((2, 3))).dtype == np.float64
    assert rgb_to_ycbcr(np.zeros((2, 3), np.uint8)).dtype == np.float32


def test_out_of_gamut_is_clipped() -> None:
    rgb = ycbcr_to_rgb(np.array([1.0, 1.0, 1.0]))  # full luma with maximal chroma
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0


def test_channels_must_be_last() -> None:
    with pytest.raises(ValueError, match=r"3 channels last.*\(3, 4, 4\)"):
        rgb_to_ycbcr(np.zeros((3, 4, 4)))
