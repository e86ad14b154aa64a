"""The shipped checkpoints, end to end: found offline, verified, chosen by --weights auto, and
giving the same fused image and flow on the example pairs as when they were released.

The expected outputs live in tests/golden/<name>.npz (fp16: fused image in [0, 1], flow in
pixels). After retraining, regenerate them deliberately and review the change:

    BSAFUSE_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

Tolerances cover float differences between CPUs and kernels (different SIMD paths sum in a
different order), not a changed model: 2e-3 on the fused image (half an 8-bit grey level) and
0.05 px on the flow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bsafuse import weights
from bsafuse.api import fuse, load_model
from bsafuse.cli import app
from bsafuse.io import read_image
from bsafuse.loading import choose

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
EXAMPLES = REPO / "examples" / "data"
UPDATE = os.environ.get("BSAFUSE_UPDATE_GOLDEN") == "1"
# pair type -> an example pair of that kind (CT case 20 and PET case 25 are validation cases; the
# SPECT pair's case 10 was trained on)
PAIRS = {
    "ct-mri": EXAMPLES / "CT-MRI" / "{}" / "20010.png",
    "pet-mri": EXAMPLES / "PET-MRI" / "{}" / "25020.png",
    "spect-mri": EXAMPLES / "SPECT-MRI" / "{}" / "10014.png",
}
MOVING = {"ct-mri": "CT", "pet-mri": "PET", "spect-mri": "SPECT"}
VERSIONS = ("v1", "v2")
# How each release ran when its golden outputs were recorded: v1 without pre-alignment or guard
# (the pipeline of its release), later ones with the default pipeline.
RUN_AS = {"v1": {"prealign": "none", "guard": False}}
SHIPPED = [f"{pair}-{v}" for pair in PAIRS for v in VERSIONS]


def _pair_type(name: str) -> str:
    return name.rsplit("-", 1)[0]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_is_registered_shipped_and_intact(name: str) -> None:
    assert name in weights.REGISTRY, f"{name} is not registered in bsafuse/weights.py"
    entry = weights.REGISTRY[name]
    shipped = REPO / "weights" / entry.filename
    assert shipped.is_file(), f"{shipped} is missing"
    assert weights.sha256_of(shipped) == entry.sha256
    assert shipped.stat().st_size < 50e6
    assert entry.url is None  # shipped with the package: nothing downloads


@pytest.mark.parametrize("name", list(PAIRS))
def test_auto_picks_the_checkpoint_for_the_moving_modality(name: str) -> None:
    moving = read_image(str(PAIRS[name]).format(MOVING[name]))
    expected = "pet-mri" if name == "spect-mri" else name  # a PNG carries no DICOM Modality: colour -> pet-mri
    assert choose("auto", moving) == weights.canonical(expected) == f"{expected}-{VERSIONS[-1]}"


@pytest.mark.parametrize("name", list(PAIRS))
def test_unversioned_names_stand_for_the_newest_release(name: str) -> None:
    assert weights.canonical(name) == f"{name}-{VERSIONS[-1]}"
    assert weights.resolve(name) == weights.resolve(f"{name}-{VERSIONS[-1]}")


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.slow
def test_golden_output_on_the_example_pair(name: str) -> None:
    model = load_model(name, device="cpu")
    pair = _pair_type(name)
    moving = read_image(str(PAIRS[pair]).format(MOVING[pair]))
    fixed = read_image(str(PAIRS[pair]).format("MRI"))
    result = fuse(moving, fixed, model, **RUN_AS.get(name.rsplit("-", 1)[1], {}))  # type: ignore[arg-type]
    fused = np.asarray(result.fused, dtype=np.float32)
    flow = np.asarray(result.flow, dtype=np.float32)
    golden = GOLDEN / f"{name}.npz"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        np.savez_compressed(golden, fused=fused.astype(np.float16), flow=flow.astype(np.float16))
        pytest.skip(f"wrote {golden}")
    expected = np.load(golden)
    assert fused.shape == expected["fused"].shape and flow.shape == expected["flow"].shape
    assert np.abs(fused - expected["fused"].astype(np.float32)).max() <= 2e-3
    assert np.abs(flow - expected["flow"].astype(np.float32)).max() <= 0.05


@pytest.mark.slow
def test_fuse_without_weights_option_uses_the_shipped_ct_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "fused.png"
    result = CliRunner().invoke(
        app,
        ["fuse", str(PAIRS["ct-mri"]).format("CT"), str(PAIRS["ct-mri"]).format("MRI"),
         "-o", str(out), "--device", "cpu", "--json"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["weights"] == [f"ct-mri-{VERSIONS[-1]}"]
    assert summary["pairs"][0]["prealign_skipped_slices"] == [0]  # an aligned atlas pair: not pre-aligned
    assert summary["pairs"][0]["prealign"] == "rigid"  # ct-mri-v2 carries no pre-alignment of its own
    fused = np.asarray(read_image(out).pixels)
    assert fused.shape == (256, 256) and fused.std() > 0.05
