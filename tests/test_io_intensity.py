"""intensity.py: windows, robust percentiles, bit depths, and their inverses."""

from __future__ import annotations

import numpy as np
import pytest

from bsafuse.errors import InputError
from bsafuse.io.intensity import (
    BRAIN_BONE_WINDOW,
    PERCENTILES,
    IntensityMap,
    bit_depth_map,
    choose_map,
    percentile_map,
    window_map,
)


def test_window_maps_its_edges_and_clips() -> None:
    imap = window_map(40.0, 80.0)
    assert (imap.low, imap.high, imap.method) == (0.0, 80.0, "window")
    np.testing.assert_allclose(imap.normalise([-1000, 0, 40, 80, 3000]), [0, 0, 0.5, 1, 1])
    assert imap.window == (40.0, 80.0)


def test_restore_inverts_normalise_inside_the_range() -> None:
    imap = window_map(*BRAIN_BONE_WINDOW)
    hu = np.linspace(-100, 300, 41)
    np.testing.assert_allclose(imap.restore(imap.normalise(hu)), hu, atol=1e-4)


def test_default_ct_window_looks_like_the_training_ct() -> None:
    imap = choose_map(np.zeros(4), modality="CT")
    brain, csf, air, bone = imap.normalise([35.0, 5.0, -1000.0, 1000.0])
    assert brain == pytest.approx(0.34, abs=0.01) and csf == pytest.approx(0.26, abs=0.01)
    assert air == 0.0 and bone == 1.0


def test_explicit_window_wins_for_every_modality() -> None:
    for modality in ("CT", "MR", None):
        assert choose_map(np.arange(10), modality=modality, window=(5.0, 2.0)).low == 4.0


def test_percentiles_are_data_values_and_robust() -> None:
    values = np.concatenate([np.arange(1000.0), [1e6]])  # one hot outlier
    imap = choose_map(values, modality="MR")
    assert imap.method == "percentile" and PERCENTILES == (0.5, 99.5)
    assert imap.low in values and imap.high in values
    assert imap.high < 1000


def test_percentiles_are_stable_under_a_round_trip() -> None:
    values = np.random.default_rng(0).normal(100, 30, 5000)
    first = percentile_map(values)
    again = percentile_map(first.restore(first.normalise(values)))
    assert again.low == pytest.approx(first.low) and again.high == pytest.approx(first.high)


def test_percentiles_ignore_non_finite_values() -> None:
    imap = percentile_map(np.array([np.nan, 1.0, 2.0, np.inf]))
    assert (imap.low, imap.high) == (1.0, 2.0)


def test_bit_depths() -> None:
    assert bit_depth_map(8).normalise(255) == 1.0 and bit_depth_map(8).normalise(51) == pytest.approx(0.2)
    assert bit_depth_map(16).high == 65535


def test_constant_image_maps_to_zero_and_back() -> None:
    imap = percentile_map(np.full(10, 7.0))
    assert np.all(imap.normalise(np.full(3, 7.0)) == 0)
    np.testing.assert_allclose(imap.restore(np.zeros(3)), 7.0)


def test_inverted_map_for_monochrome1() -> None:
    imap = IntensityMap(100.0, 0.0, "percentile")
    np.testing.assert_allclose(imap.normalise([0, 25, 100]), [1.0, 0.75, 0.0])
    np.testing.assert_allclose(imap.restore([1.0, 0.0]), [0.0, 100.0])


@pytest.mark.parametrize("window", [(40.0, 0.0), (40.0, -5.0), (np.nan, 80.0)])
def test_bad_windows_are_refused(window: tuple[float, float]) -> None:
    with pytest.raises(InputError, match="positive width"):
        window_map(*window)


def test_output_is_float32() -> None:
    assert window_map(0, 1).normalise(np.arange(3, dtype=np.int16)).dtype == np.float32
