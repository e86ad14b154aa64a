"""`bsafuse register`: the warped image and flow alone, same inputs as `fuse`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner, Result

from bsafuse.cli import app
from bsafuse.io import read_image
from bsafuse.warp import warp

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
CT, MRI = EXAMPLES / "CT-MRI" / "CT", EXAMPLES / "CT-MRI" / "MRI"


def register(*args: object) -> Result:
    return CliRunner().invoke(app, ["register", *(str(a) for a in args), "--device", "cpu"])


def test_register_writes_warped_and_flow(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out, flow_path = tmp_path / "warped.png", tmp_path / "flow.npy"
    result = register(CT / "20010.png", MRI / "20010.png", "-o", out, "--weights", tiny_checkpoint,
                      "--save-flow", flow_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    warped = np.asarray(Image.open(out), dtype=np.float32) / 255
    flow = np.load(flow_path)
    assert warped.shape == (256, 256) and flow.shape == (2, 256, 256)
    # the written image is the moving image resampled along the written flow
    moving = torch.from_numpy(read_image(CT / "20010.png").pixels)[None, None]
    expected = warp(moving, torch.from_numpy(flow)[None])[0, 0].numpy()
    assert np.abs(warped - expected).max() <= 1 / 255 + 1e-6


@pytest.mark.slow
def test_register_folders_with_json(tmp_path: Path, tiny_checkpoint: Path) -> None:
    moving, fixed = tmp_path / "ct", tmp_path / "mri"
    shutil.copytree(CT, moving)
    shutil.copytree(MRI, fixed)
    (moving / "orphan.png").write_bytes((CT / "20010.png").read_bytes())  # no MRI of that name
    result = register(moving, fixed, "-o", tmp_path / "warped", "--weights", tiny_checkpoint,
                      "--save-flow", tmp_path / "flows", "--json")  # fmt: skip
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert (summary["mode"], summary["ok"], summary["failed"]) == ("register", 2, 1)
    assert sorted(p.name for p in (tmp_path / "flows").iterdir()) == ["20010.npy", "20011.npy"]
    assert "orphan.png" in result.stderr and "Traceback" not in result.output


def test_register_missing_input_is_one_line(tmp_path: Path, tiny_checkpoint: Path) -> None:
    result = register(
        tmp_path / "nope.dcm", MRI / "20010.png", "-o", tmp_path / "w.png", "--weights", tiny_checkpoint
    )
    assert result.exit_code == 1 and "nope.dcm" in result.output and "Traceback" not in result.output
