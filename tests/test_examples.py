"""The example scripts run end to end with the tiny checkpoint (as CI smoke-runs them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(script: str, cwd: Path, *args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    command = [sys.executable, str(EXAMPLES / script), *(str(a) for a in args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_fuse_pair(tmp_path: Path, tiny_checkpoint: Path) -> None:
    done = run_example("fuse_pair.py", tmp_path, "--weights", tiny_checkpoint, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "fused.png").size == (256, 256)


@pytest.mark.slow
def test_fuse_folder(tmp_path: Path, tiny_checkpoint: Path) -> None:
    done = run_example(
        "fuse_folder.py", tmp_path, "--weights", tiny_checkpoint, "--device", "cpu", "-o", "out"
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["20010.png", "20011.png"]
    assert "2 fused, 0 skipped, 0 failed" in done.stdout


@pytest.mark.slow
def test_fuse_volume(tmp_path: Path, tiny_checkpoint: Path) -> None:
    done = run_example("fuse_volume.py", tmp_path, "--weights", tiny_checkpoint, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert nib.load(tmp_path / "fused.nii.gz").shape == (256, 256, 2)


@pytest.mark.parametrize("pair", ["PET-MRI", "SPECT-MRI"])
def test_bundled_colour_pairs_read_as_colour_moving_and_grey_fixed(pair: str) -> None:
    # The README's colour examples rely on the reader: pseudo-colour PET/SPECT is colour (fused
    # through Y, colour output), the MRI is grey, and both are in one 256 x 256 grid.
    from bsafuse.io import read_image

    moving_dir = EXAMPLES / "data" / pair / pair.split("-")[0]
    names = sorted(p.name for p in moving_dir.glob("*.png"))
    assert names
    for name in names:
        moving, fixed = read_image(moving_dir / name), read_image(EXAMPLES / "data" / pair / "MRI" / name)
        assert moving.is_colour and moving.pixels.shape == (256, 256, 3), name
        assert not fixed.is_colour and fixed.pixels.shape == (256, 256), name
        assert float(moving.pixels.min()) >= 0 and float(moving.pixels.max()) <= 1
