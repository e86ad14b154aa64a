"""`bsafuse evaluate`: image mode against the MATLAB reference values, protocol mode, usage, failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from bsafuse.cli import app
from bsafuse.evaluation import score_files
from bsafuse.io import write_image

REFERENCE = Path(__file__).resolve().parent / "data" / "metrics-reference"  # copied from ../shared
TRIPLES = json.loads((REFERENCE / "values.json").read_text())
KEYS = ("q_abf", "q_cv", "q_vif", "q_s", "q_ssim")


def run(*args: object) -> Result:
    return CliRunner().invoke(app, ["evaluate", *(str(a) for a in args)])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_evaluation import phantom  # tests/ is on sys.path (rootdir conftest)

    root = tmp_path_factory.mktemp("data")
    for i, name in enumerate(("1001", "1002", "2001")):
        write_image(root / "CT" / f"{name}.png", phantom(i))
        write_image(root / "MRI" / f"{name}.png", phantom(i, mri=True))
    return root


def test_image_mode_json_gives_the_reference_values() -> None:
    triple = TRIPLES[0]
    result = run("--fused", REFERENCE / triple["fused"], "--moving", REFERENCE / triple["a"],
                 "--fixed", REFERENCE / triple["b"], "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)["metrics"]
    for key in KEYS:
        assert scores[key] == pytest.approx(triple[key], rel=1e-9), key
    assert "Q_AB/F" in result.stderr and "↓" in result.stderr  # the table, on stderr


def test_score_files_reproduces_the_reference_triples() -> None:
    for triple in TRIPLES[::3]:  # one fusion rule per pair (test_metrics_reference.py checks all 36)
        scores = score_files(REFERENCE / triple["fused"], REFERENCE / triple["a"], REFERENCE / triple["b"])
        for key in KEYS:
            assert scores[key] == pytest.approx(triple[key], rel=1e-9), (triple["fused"], key)


def test_colour_moving_image_is_scored_on_its_luma() -> None:
    """The reference's PET A images are the BT.601 Y of the RGB originals, rounded half up."""
    triple = next(t for t in TRIPLES if t["a"].startswith("images/pet"))
    rgb = REFERENCE.parent / "harvard" / "PET-MRI" / "PET" / f"{Path(triple['a']).name[3:8]}.png"
    scores = score_files(REFERENCE / triple["fused"], rgb, REFERENCE / triple["b"])
    for key in KEYS:
        assert scores[key] == pytest.approx(triple[key], rel=1e-9), key


def test_image_mode_errors(tmp_path: Path) -> None:
    assert run().exit_code == 2
    assert run(tmp_path, "--fused", tmp_path / "f.png").exit_code == 2  # both modes
    assert run("--fused", tmp_path / "f.png").exit_code == 2  # not all three
    assert run(tmp_path).exit_code == 2  # protocol without -o
    missing = run(
        "--fused", tmp_path / "f.png", "--moving", tmp_path / "a.png", "--fixed", tmp_path / "b.png"
    )
    assert missing.exit_code == 1 and "f.png" in missing.output and "Traceback" not in missing.output


def test_image_mode_refuses_different_sizes(tmp_path: Path) -> None:
    import numpy as np

    write_image(tmp_path / "f.png", np.full((64, 64), 0.5, np.float32))
    write_image(tmp_path / "a.png", np.full((64, 64), 0.5, np.float32))
    write_image(tmp_path / "b.png", np.full((48, 64), 0.5, np.float32))
    result = run("--fused", tmp_path / "f.png", "--moving", tmp_path / "a.png", "--fixed", tmp_path / "b.png")
    assert result.exit_code == 1 and "same size" in result.output


def test_protocol_json_files_and_table(data_dir: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = run(data_dir, "--weights", tiny_checkpoint, "--methods", "bsafuse,average", "--limit", "2",
                 "--seed", "3", "--device", "cpu", "-o", out, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["settings"]["seed"] == 3 and document["settings"]["pairs"] == ["1001", "1002"]
    assert document["summary"]["bsafuse"]["pairs"] == 2
    assert document["summary"]["average"]["metrics"]["epe_mean"]["mean"] is None
    assert json.loads((out / "summary.json").read_text())["summary"] == document["summary"]
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 2 * 2
    assert (
        "Q_AB/F ↑" in result.stderr
        and "EPE mean (px) ↓" in result.stderr
        and "wrote results.csv" in result.stderr
    )


def test_protocol_failed_pair_exits_1_after_the_rest(data_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "MRI" / "1002.png").write_bytes(b"not an image")
    result = run(data, "--methods", "average", "-o", tmp_path / "eval")
    assert result.exit_code == 1
    assert "1002" in result.stderr and "1 of 3 pairs had failures" in result.stderr
    rows = (tmp_path / "eval" / "results.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 and sum(row.endswith(",") for row in rows) == 2  # two rows without an error


def test_help_says_the_moving_image_must_be_the_aligned_one() -> None:
    result = CliRunner().invoke(app, ["evaluate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "ground-truth-aligned" in result.output and "--val-cases" in result.output
