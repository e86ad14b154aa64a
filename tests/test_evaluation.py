"""The evaluation protocol (bsafuse.evaluation): deformation, methods, scoring, files, failures.

One protocol run on 3 synthetic pairs with the tiny `small`-config checkpoint is shared by most
tests (SimpleITK is replaced by a planted flow there: its B-spline takes ~25 s per pair).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bsafuse.deform import DeformParams
from bsafuse.errors import InputError
from bsafuse.evaluation import run_protocol, write_outputs
from bsafuse.evaluation.cases import find_sources, load_case
from bsafuse.evaluation.methods import MethodRunner, check_methods, identity_registration
from bsafuse.evaluation.scoring import fusion_scores, to_uint8_levels
from bsafuse.io import read_image, write_image
from bsafuse.metrics import endpoint_error
from bsafuse.weights import sha256_of

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
NAMES = ("1001", "1002", "2001")  # cases 1, 1, 2
METHODS = ("bsafuse", "network", "rigid", "none", "simpleitk", "simpleitk+bsafuse", "oracle", "average", "max")
PLANTED = (1.5, -0.5)  # px: the flow the stand-in for SimpleITK returns


def phantom(seed: int, size: int = 64, *, mri: bool = False) -> np.ndarray:
    """A head-like image with seeded smooth texture; `mri` gives the other modality's contrast."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / size - 0.5
    head = 1 / (1 + np.exp(np.minimum(30 * ((xs / 0.38) ** 2 + (ys / 0.44) ** 2 - 1), 50)))
    texture = sum(
        rng.uniform(0.2, 0.5)
        * np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * rng.uniform(0.03, 0.08) ** 2))
        for cx, cy in rng.uniform(-0.25, 0.25, (6, 2))
    )
    image = (
        head * (0.5 + texture)
        if mri
        else head * 0.3 + (head > 0.5) * (xs**2 + ys**2 > 0.1) * 0.6 + texture * head
    )
    return np.clip(image, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An aligned data folder (CT/ + MRI/) of 3 synthetic 64x64 pairs."""
    root = tmp_path_factory.mktemp("data")
    for i, name in enumerate(NAMES):
        write_image(root / "CT" / f"{name}.png", phantom(i))
        write_image(root / "MRI" / f"{name}.png", phantom(i, mri=True))
    return root


@pytest.fixture(scope="module")
def run(data_dir: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One protocol run with every method; results written to a folder."""
    out = tmp_path_factory.mktemp("eval")
    calls = []

    def planted(moving: np.ndarray, fixed: np.ndarray, *, kind: str = "affine", **_: object) -> tuple[np.ndarray, ...]:
        """Stands in for every SimpleITK registration: the planted flow after each stage up to `kind`."""
        calls.append(kind)
        flow = np.zeros((2, *fixed.shape), np.float32)
        flow[0], flow[1] = PLANTED
        return (flow,) * (("rigid", "affine", "bspline").index(kind) + 1)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("bsafuse.prealign.register_stages", planted)
        report = run_protocol(
            data_dir, weights=tiny_checkpoint, methods=METHODS, seed=0, device="cpu", save_images=out
        )
    files, _ = write_outputs(report, out)
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((out / "summary.json").read_text())
    return {"report": report, "out": out, "rows": rows, "summary": summary, "files": files, "calls": calls}


def rows_of(run: dict, method: str) -> list[dict]:
    return [r for r in run["rows"] if r["method"] == method]


def flow_true(run: dict, name: str) -> np.ndarray:
    return np.load(run["out"] / "pairs" / "flow" / f"{name}.npy")


def test_files_rows_and_settings(run: dict, tiny_checkpoint: Path) -> None:
    assert len(run["rows"]) == len(NAMES) * len(METHODS)
    assert [r["method"] for r in run["rows"][: len(METHODS)]] == list(METHODS)
    assert all(r["error"] == "" for r in run["rows"])
    settings = run["summary"]["settings"]
    assert settings["weights"]["sha256"] == sha256_of(tiny_checkpoint)
    assert settings["weights"]["path"] == str(tiny_checkpoint)
    assert settings["seed"] == 0 and settings["deform"]["rotate_deg"] == DeformParams().rotate_deg
    assert settings["pairs"] == list(NAMES) and settings["layout"] == "aligned"
    # B-spline once per pair, shared by both SimpleITK methods; rigid once per pair for `bsafuse`
    # (the default pipeline pre-aligns) and once for `rigid`
    assert run["calls"].count("bspline") == len(NAMES)
    assert run["calls"].count("rigid") == len(NAMES) * sum(m in ("bsafuse", "rigid") for m in METHODS)
    for sub in ("moving", "fixed", "label", "flow"):
        assert len(list((run["out"] / "pairs" / sub).iterdir())) == len(NAMES)
    assert len(list((run["out"] / "fused").iterdir())) == len(METHODS)
    pytest.importorskip("matplotlib")
    assert (run["out"] / "boxplot_q_abf.png").is_file() and (run["out"] / "boxplot_epe_mean.png").is_file()


def test_summary_is_the_mean_of_the_rows(run: dict) -> None:
    for method in METHODS:
        stats = run["summary"]["summary"][method]
        assert stats["pairs"] == len(NAMES) and stats["failed"] == 0
        values = [float(r["q_abf"]) for r in rows_of(run, method)]
        assert stats["metrics"]["q_abf"]["mean"] == pytest.approx(np.mean(values), rel=1e-12)
        assert stats["metrics"]["q_abf"]["std"] == pytest.approx(np.std(values), rel=1e-9, abs=1e-15)


def test_oracle_has_zero_epe_and_none_has_the_true_flow_as_error(run: dict) -> None:
    for row in rows_of(run, "oracle"):
        assert float(row["epe_mean"]) == 0 and float(row["epe_p95"]) == 0
        assert float(row["ncc"]) > 0.95
    for row in rows_of(run, "none"):
        truth = flow_true(run, row["pair"])
        assert float(row["epe_mean"]) == pytest.approx(np.linalg.norm(truth, axis=0).mean(), rel=1e-6)
        assert float(row["epe_mean"]) > 0.3  # the deformation is real
        assert float(row["folding"]) == 0


def test_simpleitk_reports_its_own_flow(run: dict) -> None:
    planted = np.zeros_like(flow_true(run, NAMES[0]))
    planted[0], planted[1] = PLANTED
    for row in rows_of(run, "simpleitk"):
        expected = endpoint_error(planted, flow_true(run, row["pair"]))["mean"]
        assert float(row["epe_mean"]) == pytest.approx(expected, rel=1e-6)
    assert all(r["epe_mean"] != "" for r in rows_of(run, "simpleitk+bsafuse"))


def test_average_is_the_mean_of_label_and_fixed(run: dict, data_dir: Path) -> None:
    (source, *_) = find_sources(data_dir)[2]
    case = load_case(source, seed=0, params=DeformParams())
    result = MethodRunner(None).run("average", case)
    np.testing.assert_allclose(result.fused, (case.label + case.fixed) / 2, atol=1e-7)
    assert result.flow is None and result.warped is None
    row = rows_of(run, "average")[0]
    assert row["epe_mean"] == row["ncc"] == row["folding"] == ""  # does not register
    assert float(row["q_abf"]) == pytest.approx(
        fusion_scores(result.fused, case.label, case.fixed)["q_abf"], rel=1e-12
    )
    saved = read_image(run["out"] / "fused" / "average" / f"{source.name}.png").pixels
    np.testing.assert_array_equal(to_uint8_levels(saved), to_uint8_levels(result.fused))


def test_max_is_the_pixel_maximum_of_label_and_fixed(run: dict, data_dir: Path) -> None:
    (source, *_) = find_sources(data_dir)[2]
    case = load_case(source, seed=0, params=DeformParams())
    result = MethodRunner(None).run("max", case)
    expected = np.maximum(case.label, case.fixed)
    assert float(np.abs(expected - (case.label + case.fixed) / 2).max()) > 0.1  # differs from average
    np.testing.assert_array_equal(result.fused, expected)
    assert result.flow is None and result.warped is None
    assert float(rows_of(run, "max")[0]["q_abf"]) == pytest.approx(
        fusion_scores(result.fused, case.label, case.fixed)["q_abf"], rel=1e-12
    )


def test_rigid_flow_is_the_pre_alignment_and_network_runs_without_it(run: dict) -> None:
    for row in rows_of(run, "rigid"):
        planted = np.zeros((2, *flow_true(run, row["pair"]).shape[1:]), np.float32)
        planted[0], planted[1] = PLANTED
        assert float(row["epe_mean"]) == pytest.approx(
            float(np.linalg.norm(planted - flow_true(run, row["pair"]), axis=0).mean()), rel=1e-4
        )
    assert all(r["error"] == "" and r["epe_mean"] != "" for r in rows_of(run, "network"))


def test_same_seed_same_deformation_whatever_the_selection(data_dir: Path) -> None:
    sources = find_sources(data_dir)[2]
    a = load_case(sources[1], seed=0, params=DeformParams())
    b = load_case(sources[1], seed=0, params=DeformParams())
    c = load_case(sources[1], seed=1, params=DeformParams())
    np.testing.assert_array_equal(a.flow_true, b.flow_true)
    assert not np.allclose(a.flow_true, c.flow_true)
    np.testing.assert_array_equal(a.label, read_image(sources[1].moving).pixels)


def test_identity_registration_zeroes_the_flow_only_inside(tiny_model: torch.nn.Module) -> None:
    moving, fixed = torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64)  # any multiple of 16
    with torch.inference_mode():
        with identity_registration(tiny_model):
            inside = tiny_model(moving, fixed)
        outside = tiny_model(moving, fixed)
    assert torch.count_nonzero(inside.flow) == 0 and torch.all(inside.valid == 1)
    assert torch.count_nonzero(outside.flow) > 0


def test_predeformed_folder_gives_the_same_numbers(run: dict) -> None:
    pairs = run["out"] / "pairs"
    report = run_protocol(pairs, methods=["average"], device="cpu", val_cases=["1"])
    assert report.settings["layout"] == "pre-deformed" and report.settings["deform"] is None
    assert [r["pair"] for r in report.rows] == ["1001", "1002"]
    for row in report.rows:
        before = next(r for r in rows_of(run, "average") if r["pair"] == row["pair"])
        assert row["q_cv"] == pytest.approx(float(before["q_cv"]), rel=1e-12)


def test_predeformed_none_epe_uses_flow_files_and_skips_without_them(
    run: dict, tmp_path: Path, tiny_model
) -> None:
    pairs = tmp_path / "pairs"
    shutil.copytree(run["out"] / "pairs", pairs)
    report = run_protocol(pairs, methods=["none"], model=tiny_model, limit=1)
    expected = next(r for r in rows_of(run, "none") if r["pair"] == NAMES[0])
    assert report.rows[0]["epe_mean"] == pytest.approx(float(expected["epe_mean"]), rel=1e-6)
    (pairs / "flow" / f"{NAMES[0]}.npy").unlink()
    report = run_protocol(pairs, methods=["none"], model=tiny_model, limit=1)
    assert report.rows[0]["epe_mean"] is None and report.rows[0]["ncc"] is not None


def test_a_corrupt_pair_is_reported_and_the_rest_continue(data_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "CT" / "1500.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    shutil.copy(data / "MRI" / "1001.png", data / "MRI" / "1500.png")
    report = run_protocol(data, methods=["average"], device="cpu")
    assert len(report.rows) == 4 and report.failed_pairs == ["1500"]
    assert "1500.png" in report.failures[0]["error"] and report.failures[0]["method"] is None
    assert [r["pair"] for r in report.rows if not r["error"]] == ["1001", "1002", "2001"]
    files, _ = write_outputs(report, tmp_path / "out", plots=False)
    with open(files[0], newline="") as f:
        failed = [r for r in csv.DictReader(f) if r["error"]]
    assert [r["pair"] for r in failed] == ["1500"] and failed[0]["q_abf"] == ""


def test_colour_moving_images_are_scored_on_their_luma(tmp_path: Path) -> None:
    if not (EXAMPLES / "PET-MRI").is_dir():
        pytest.skip("examples/data/PET-MRI not found")
    report = run_protocol(EXAMPLES / "PET-MRI", methods=["average"], limit=1)
    assert report.settings["modality"] == "PET" and not report.failures
    assert 0 < report.rows[0]["q_abf"] < 1


def test_plots_are_skipped_without_matplotlib(
    run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.backends.backend_agg", None)
    files, notes = write_outputs(run["report"], tmp_path)
    assert [f.name for f in files] == ["results.csv", "summary.json"]
    assert len(notes) == 1 and "matplotlib" in notes[0]


def test_val_cases_auto_reads_the_training_run(
    data_dir: Path, tmp_path: Path, tiny_model: torch.nn.Module
) -> None:
    from bsafuse.errors import WeightsError
    from bsafuse.weights import save_checkpoint

    trained = save_checkpoint(
        tmp_path / "trained.pt", tiny_model, train={"config": {"val_cases": ["2"], "seed": 0}}
    )
    report = run_protocol(data_dir, weights=trained, methods=["average"], val_cases="auto")
    assert report.settings["val_cases"] == ["2"] and report.pairs == ["2001"]
    nested = {"recipe": {"val_cases": ["2"], "seed": 0}, "run": {"data_dir": "d", "run_dir": "r"}}  # today's layout
    trained = save_checkpoint(tmp_path / "nested.pt", tiny_model, train={"config": nested})
    report = run_protocol(data_dir, weights=trained, methods=["average"], val_cases="auto")
    assert report.settings["val_cases"] == ["2"] and report.pairs == ["2001"]
    bare = save_checkpoint(tmp_path / "bare.pt", tiny_model)
    with pytest.raises(WeightsError, match="needs a checkpoint written by `bsafuse train`"):
        run_protocol(data_dir, weights=bare, methods=["average"], val_cases="auto")


def test_bad_arguments_are_input_errors(data_dir: Path) -> None:
    with pytest.raises(InputError, match=r"unknown method.*choose from"):
        check_methods(["bsafuse", "ants"])
    with pytest.raises(InputError, match="no such case"):
        run_protocol(data_dir, methods=["average"], val_cases=["7"])
    with pytest.raises(InputError, match="no MRI/ folder"):
        run_protocol(data_dir / "CT", methods=["average"])
