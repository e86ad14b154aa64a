"""The committed fixtures in tests/data: readable, and what make_fixtures.py writes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from bsafuse.io import read_image

DATA = Path(__file__).parent / "data"
FILES = ("ct_32.png", "mri_32.png", "pet_32.png", "mri_2slice.nii.gz", "ct_32.dcm")


def load_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("make_fixtures", DATA / "make_fixtures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", FILES)
def test_committed_fixture_matches_the_script(tmp_path: Path, name: str) -> None:
    load_script().main(tmp_path)
    committed, fresh = read_image(DATA / name), read_image(tmp_path / name)
    assert (DATA / name).stat().st_size < 8_000
    np.testing.assert_array_equal(committed.pixels, fresh.pixels)
    assert committed.spacing == fresh.spacing and committed.origin == fresh.origin


def test_fixtures_agree_across_formats() -> None:
    ct_png, ct_dcm = read_image(DATA / "ct_32.png"), read_image(DATA / "ct_32.dcm")
    assert ct_dcm.modality == "CT" and ct_dcm.intensity.method == "window"
    np.testing.assert_allclose(ct_dcm.pixels, ct_png.pixels, atol=0.5 / 255)  # same default window
    mri_png = read_image(DATA / "mri_32.png")
    mri_nii = read_image(DATA / "mri_2slice.nii.gz", slice_index=0, window=(500.0, 1000.0))
    np.testing.assert_allclose(mri_nii.pixels, mri_png.pixels, atol=0.5 / 255)  # the axis convention
    assert mri_nii.spacing == pytest.approx((1.0, 1.0, 3.0))
