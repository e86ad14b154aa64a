"""`bsafuse deform`: writes a deformed image and the flow that undoes it; never overwrites its input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bsafuse.cli import app
from bsafuse.warp import warp

runner = CliRunner()


def grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32) / 255


def undo(deformed: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(deformed warped by flow, mask of pixels where it has data); arrays (H, W) or (H, W, 3)."""
    pixels = torch.from_numpy(deformed if deformed.ndim == 3 else deformed[..., None]).permute(2, 0, 1)[None]
    flow_t = torch.from_numpy(flow)[None]
    restored = warp(pixels, flow_t)[0].permute(1, 2, 0).numpy()
    covered = warp(torch.ones(1, 1, *flow.shape[1:]), flow_t)[0, 0].numpy() > 0.999
    return (restored if deformed.ndim == 3 else restored[..., 0]), covered


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    a, b = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture
def ct_png(harvard: Path, tmp_path: Path) -> Path:
    return Path(shutil.copy(harvard / "CT-MRI" / "CT" / "16003.png", tmp_path / "ct.png"))


def test_writes_the_image_and_a_flow_that_undoes_it(ct_png: Path, tmp_path: Path) -> None:
    out, flow_path = tmp_path / "moved.png", tmp_path / "flow.npy"
    result = runner.invoke(
        app, ["deform", str(ct_png), "-o", str(out), "--save-flow", str(flow_path), "--seed", "5"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "moved.png" in result.output and "max" in result.output

    original, deformed, flow = grey(ct_png), grey(out), np.load(flow_path)
    assert Image.open(out).mode == "L" and deformed.shape == original.shape
    assert flow.shape == (2, *original.shape) and flow.dtype == np.float32
    restored, covered = undo(deformed, flow)
    head = (original > 0.05) & covered
    assert head.sum() > 0.95 * (original > 0.05).sum()
    assert ncc(original, deformed, head) < 0.9
    assert ncc(original, restored, head) > 0.97


def test_same_seed_same_output_and_amplitudes_are_used(ct_png: Path, tmp_path: Path) -> None:
    paths = [tmp_path / f"{name}.png" for name in ("a", "b", "still")]
    for path in paths[:2]:
        assert runner.invoke(app, ["deform", str(ct_png), "-o", str(path), "--seed", "2"]).exit_code == 0
    assert np.array_equal(grey(paths[0]), grey(paths[1]))
    zero = ["--rotate", "0", "--translate", "0", "--elastic", "0", "--scale", "0"]
    flow_path = tmp_path / "zero.npy"
    result = runner.invoke(
        app, ["deform", str(ct_png), "-o", str(paths[2]), *zero, "--save-flow", str(flow_path)]
    )
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.load(flow_path), np.zeros((2, 256, 256), np.float32))
    assert np.abs(grey(paths[2]) - grey(ct_png)).max() <= 1 / 255 + 1e-6


def test_colour_image_stays_colour_with_one_field(harvard: Path, tmp_path: Path) -> None:
    source = sorted((harvard / "PET-MRI" / "PET").glob("*.png"))[0]
    out, flow_path = tmp_path / "pet.png", tmp_path / "pet.npy"
    result = runner.invoke(app, ["deform", str(source), "-o", str(out), "--save-flow", str(flow_path)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).mode == "RGB"
    original = np.asarray(Image.open(source).convert("RGB"), dtype=np.float32) / 255
    restored, covered = undo(np.asarray(Image.open(out), dtype=np.float32) / 255, np.load(flow_path))
    body = (original.max(axis=-1) > 0.05) & covered
    for channel in range(3):
        assert ncc(original[..., channel], restored[..., channel], body) > 0.95


def test_output_equal_to_input_is_refused(ct_png: Path) -> None:
    before = ct_png.read_bytes()
    for target in (str(ct_png), str(ct_png.parent / "." / "ct.png")):
        result = runner.invoke(app, ["deform", str(ct_png), "-o", target])
        assert result.exit_code == 1
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "is the input image; refusing to overwrite it" in lines[0]
    flow_onto_input = runner.invoke(
        app, ["deform", str(ct_png), "-o", str(ct_png.parent / "x.png"), "--save-flow", str(ct_png)]
    )
    assert flow_onto_input.exit_code == 1
    assert ct_png.read_bytes() == before


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--save-flow", "flow.txt"], 1, "use a .npy or .nii.gz file name"),
        (["--elastic", "9"], 2, "--elastic"),
        (["--rotate", "-1"], 2, "--rotate"),
    ],
)
def test_bad_options(ct_png: Path, tmp_path: Path, extra: list[str], code: int, message: str) -> None:
    out = tmp_path / "out.png"
    result = runner.invoke(app, ["deform", str(ct_png), "-o", str(out), *extra])
    assert result.exit_code == code
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_missing_input_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["deform", str(tmp_path / "nope.png"), "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 1
    assert "nope.png does not exist" in result.output and len(result.output.strip().splitlines()) == 1


def test_volume_needs_a_slice(tmp_path: Path) -> None:
    import nibabel as nib

    volume = tmp_path / "vol.nii.gz"
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((40, 40, 3), dtype=np.float32), np.eye(4)), volume
    )
    result = runner.invoke(app, ["deform", str(volume), "-o", str(tmp_path / "v.nii.gz")])
    assert result.exit_code == 1 and "is a volume" in result.output and "--slice N" in result.output
    sliced = runner.invoke(app, ["deform", str(volume), "-o", str(tmp_path / "v.nii.gz"), "--slice", "1"])
    assert sliced.exit_code == 0, sliced.output
    assert nib.load(tmp_path / "v.nii.gz").shape[:2] == (40, 40)
