"""`bsafuse fuse`: formats, geometry, colour, folders, reruns and one-line failures (tiny checkpoint)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner, Result

from bsafuse import weights
from bsafuse.cli import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
CT, MRI = EXAMPLES / "CT-MRI" / "CT", EXAMPLES / "CT-MRI" / "MRI"
PET, PET_MRI = EXAMPLES / "PET-MRI" / "PET" / "25020.png", EXAMPLES / "PET-MRI" / "MRI" / "25020.png"


def run(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def fuse(moving: Path, fixed: Path, output: Path, ckpt: Path, *extra: object) -> Result:
    return run("fuse", moving, fixed, "-o", output, "--weights", ckpt, "--device", "cpu", *extra)


def assert_one_line_error(result: Result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def blob(height: int, width: int, shift: float = 0.0) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    r2 = ((xs - width / 2 - shift) / (0.3 * width)) ** 2 + ((ys - height / 2) / (0.35 * height)) ** 2
    return np.clip(1.2 - r2, 0, 1).astype(np.float32)


def dicom_slice(path: Path, stored: np.ndarray, *, modality: str, rescale: tuple[float, float]) -> Path:
    """A minimal grey DICOM slice written with pydicom (0.8 x 0.8 mm, placed at (-20, -30, 40))."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID = modality, generate_uid()
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 1
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [-20.0, -30.0, 40.0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 2.0
    ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = stored.astype("<i2").tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


# ---------------------------------------------------------------------------------- happy paths


def test_png_pair_with_flow_and_warped(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "out" / "fused.png"
    result = fuse(CT / "20010.png", MRI / "20010.png", out, tiny_checkpoint,
                  "--save-flow", tmp_path / "flow.npy", "--save-warped", tmp_path / "warped.png")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"weights: {tiny_checkpoint}" in result.output and "device: cpu" in result.output
    fused = np.asarray(Image.open(out))
    assert fused.shape == (256, 256) and fused.dtype == np.uint8
    flow = np.load(tmp_path / "flow.npy")
    assert flow.shape == (2, 256, 256) and flow.dtype == np.float32
    assert np.asarray(Image.open(tmp_path / "warped.png")).shape == (256, 256)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_json_summary_is_the_only_stdout(tmp_path: Path, tiny_checkpoint: Path) -> None:
    result = fuse(CT / "20011.png", MRI / "20011.png", tmp_path / "f.png", tiny_checkpoint, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["ok"] == 1 and summary["failed"] == 0 and summary["weights"] == [str(tiny_checkpoint)]
    assert summary["pairs"][0]["status"] == "ok"


def test_json_names_the_pre_alignment_that_ran(tmp_path: Path, tiny_checkpoint: Path) -> None:
    calibrated = tmp_path / "affine.pt"  # weights that carry their own pre-alignment
    weights.export_checkpoint(tiny_checkpoint, calibrated, prealign="affine")
    own = fuse(CT / "20011.png", MRI / "20011.png", tmp_path / "a.png", calibrated, "--json")
    assert own.exit_code == 0, own.output
    assert json.loads(own.stdout)["pairs"][0]["prealign"] == "affine"
    asked = fuse(CT / "20011.png", MRI / "20011.png", tmp_path / "n.png", calibrated, "--json", "--prealign", "none")
    assert json.loads(asked.stdout)["pairs"][0]["prealign"] == "none"  # the user's choice wins


@pytest.mark.slow
def test_colour_moving_gives_colour_output(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "fused.png"
    result = fuse(PET, PET_MRI, out, tiny_checkpoint)
    assert result.exit_code == 0, result.output
    fused = Image.open(out)
    assert fused.mode == "RGB" and fused.size == (256, 256)


@pytest.mark.slow
def test_grey_stored_as_rgb_is_grey_in_and_out(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """The BSAFusion authors' published CT test pairs are 3-channel PNGs with R = G = B."""
    grey = np.asarray(Image.open(CT / "20010.png"))
    Image.fromarray(np.repeat(grey[..., None], 3, axis=-1)).save(tmp_path / "rgb.png")
    out = tmp_path / "fused.png"
    assert fuse(tmp_path / "rgb.png", MRI / "20010.png", out, tiny_checkpoint).exit_code == 0
    with Image.open(out) as fused:
        assert fused.mode == "L" and fused.size == (256, 256)  # a grey output
    result = run("fuse", tmp_path / "rgb.png", MRI / "20010.png", "-o", tmp_path / "auto.png",
                 "--device", "cpu", "--json", "--prealign", "none")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["weights"] == [weights.canonical("ct-mri")]  # grey weights


def test_dicom_pair_writes_dicom_in_fixed_geometry(tmp_path: Path, tiny_checkpoint: Path) -> None:
    ct = dicom_slice(tmp_path / "ct.dcm", (blob(64, 48, 2) * 1500 - 500).astype(np.int16),
                     modality="CT", rescale=(1.0, 0.0))  # fmt: skip
    mr = dicom_slice(
        tmp_path / "mr.dcm", (blob(64, 48) * 800).astype(np.int16), modality="MR", rescale=(1.0, 0.0)
    )
    out = tmp_path / "fused.dcm"
    result = fuse(ct, mr, out, tiny_checkpoint)
    assert result.exit_code == 0, result.output
    written, fixed = pydicom.dcmread(out), pydicom.dcmread(mr)
    assert (written.Rows, written.Columns) == (64, 48)
    assert [float(v) for v in written.ImagePositionPatient] == [float(v) for v in fixed.ImagePositionPatient]
    assert [float(v) for v in written.PixelSpacing] == [0.8, 0.8]
    assert written.pixel_array.shape == (64, 48)


def test_mixed_formats_png_moving_dicom_fixed_to_nifti(tmp_path: Path, tiny_checkpoint: Path) -> None:
    Image.fromarray((blob(64, 48, 3) * 255).astype(np.uint8)).save(tmp_path / "ct.png")
    mr = dicom_slice(
        tmp_path / "mr", (blob(64, 48) * 800).astype(np.int16), modality="MR", rescale=(1.0, 0.0)
    )
    out = tmp_path / "fused.nii.gz"
    result = fuse(tmp_path / "ct.png", mr, out, tiny_checkpoint)  # a DICOM file without a suffix
    assert result.exit_code == 0, result.output
    assert nib.load(out).shape[:2] in ((48, 64), (64, 48))


def test_nifti_2d_keeps_affine_and_saves_a_nifti_flow(tmp_path: Path, tiny_checkpoint: Path) -> None:
    affine = np.array([[0.9, 0, 0, -30], [0, 1.1, 0, -40], [0, 0, 3, 12], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(blob(48, 64, 2).T, affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(blob(48, 64).T, affine), tmp_path / "mr.nii.gz")
    out, flow = tmp_path / "fused.nii.gz", tmp_path / "flow.nii.gz"
    result = fuse(tmp_path / "ct.nii.gz", tmp_path / "mr.nii.gz", out, tiny_checkpoint, "--save-flow", flow)
    assert result.exit_code == 0, result.output
    written = nib.load(out)
    assert written.shape == (64, 48) and np.allclose(written.affine, affine)
    field = nib.load(flow)
    assert field.shape == (64, 48, 1, 1, 2) and np.allclose(field.affine, affine)


def test_nifti_volume_is_resampled_into_the_fixed_grid(tmp_path: Path, tiny_checkpoint: Path) -> None:
    fixed_affine = np.array([[1.0, 0, 0, -16], [0, 1.0, 0, -20], [0, 0, 4.0, -4], [0, 0, 0, 1]])
    moving_affine = np.array([[2.0, 0, 0, -16], [0, 2.0, 0, -20], [0, 0, 4.0, -4], [0, 0, 0, 1]])
    fixed = np.stack([blob(40, 32, s) for s in (0, 1, 2)], axis=-1).transpose(1, 0, 2)  # (x, y, z)
    moving = np.stack([blob(20, 16, s) for s in (0, 1, 2)], axis=-1).transpose(1, 0, 2)
    nib.save(nib.Nifti1Image(fixed, fixed_affine), tmp_path / "mr.nii.gz")
    nib.save(nib.Nifti1Image(moving, moving_affine), tmp_path / "ct.nii.gz")
    out = tmp_path / "fused.nii.gz"
    result = fuse(tmp_path / "ct.nii.gz", tmp_path / "mr.nii.gz", out, tiny_checkpoint,
                  "--save-flow", tmp_path / "flow.npy", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    written = nib.load(out)
    assert written.shape == (32, 40, 3) and np.allclose(written.affine, fixed_affine)
    assert np.load(tmp_path / "flow.npy").shape == (3, 2, 40, 32)


def test_report_panel(tmp_path: Path, tiny_checkpoint: Path) -> None:
    report = tmp_path / "report.png"
    result = fuse(
        CT / "20010.png", MRI / "20010.png", tmp_path / "f.png", tiny_checkpoint, "--report", report
    )
    assert result.exit_code == 0, result.output
    assert Image.open(report).size[0] > 800


# --------------------------------------------------------------------------------------- folders


@pytest.mark.slow
def test_folder_run_continues_past_a_bad_pair_and_reruns_skip(tmp_path: Path, tiny_checkpoint: Path) -> None:
    moving, fixed, out = tmp_path / "ct", tmp_path / "mri", tmp_path / "fused"
    shutil.copytree(CT, moving)
    shutil.copytree(MRI, fixed)
    (moving / "bad.png").write_bytes((CT / "20010.png").read_bytes()[:300])  # truncated
    shutil.copy(MRI / "20010.png", fixed / "bad.png")
    result = fuse(moving, fixed, out, tiny_checkpoint)
    assert result.exit_code == 1
    assert sorted(p.name for p in out.iterdir()) == ["20010.png", "20011.png"]
    assert (
        "bad.png" in result.output
        and "2 done, 0 skipped, 1 failed" in result.output
        and "--overwrite redoes" not in result.output  # nothing was skipped: no hint about skipping
        and "Traceback" not in result.output
    )
    stamp = (out / "20010.png").stat().st_mtime_ns

    again = fuse(moving, fixed, out, tiny_checkpoint, "--json")
    assert again.exit_code == 1
    summary = json.loads(again.stdout)
    assert (summary["ok"], summary["skipped"], summary["failed"]) == (0, 2, 1)
    assert (out / "20010.png").stat().st_mtime_ns == stamp
    assert "0 done, 2 skipped (outputs exist; --overwrite redoes them), 1 failed" in again.stderr

    (moving / "bad.png").unlink()
    redo = fuse(moving, fixed, out, tiny_checkpoint, "--overwrite", "--pattern", "20010*")
    assert redo.exit_code == 0, redo.output
    assert "1 done, 0 skipped" in redo.output and (out / "20010.png").stat().st_mtime_ns != stamp


# ---------------------------------------------------------------------------------- bad inputs


def test_flags_take_no_value_in_help() -> None:
    result = run("fuse", "--help")
    assert result.exit_code == 0
    flags = [line for line in result.output.splitlines() if "--overwrite" in line or "--json" in line]
    assert flags and all("<bool>" not in line for line in flags), flags


def test_bad_inputs_fail_with_one_line(tmp_path: Path, tiny_checkpoint: Path) -> None:
    good, mri = CT / "20010.png", MRI / "20010.png"
    out = tmp_path / "out.png"
    assert_one_line_error(fuse(tmp_path / "missing.png", mri, out, tiny_checkpoint), "missing.png")

    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    assert_one_line_error(fuse(truncated, mri, out, tiny_checkpoint), "truncated.png")

    assert_one_line_error(fuse(good, PET, out, tiny_checkpoint), "25020.png", "grey MRI")

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert_one_line_error(fuse(text, mri, out, tiny_checkpoint), "notes.txt")

    nib.save(nib.Nifti1Image(np.zeros((16, 16, 3), np.float32), np.eye(4)), tmp_path / "vol.nii.gz")
    assert_one_line_error(fuse(tmp_path / "vol.nii.gz", mri, out, tiny_checkpoint), "vol.nii.gz", "volume")
    assert not out.exists()


def test_output_never_overwrites_an_input(tmp_path: Path, tiny_checkpoint: Path) -> None:
    fixed = tmp_path / "mri.png"
    shutil.copy(MRI / "20010.png", fixed)
    before = fixed.read_bytes()
    assert_one_line_error(fuse(CT / "20010.png", fixed, fixed, tiny_checkpoint), "refusing to overwrite")
    assert fixed.read_bytes() == before


def test_usage_errors_exit_2(tmp_path: Path, tiny_checkpoint: Path) -> None:
    result = fuse(
        CT / "20010.png", MRI / "20010.png", tmp_path / "f.png", tiny_checkpoint, "--prealign", "bspline"
    )
    assert result.exit_code == 2
    for window in ("40", "40,-5", "nan,inf", "40,0"):  # one rule for every malformed window
        result = fuse(CT / "20010.png", MRI / "20010.png", tmp_path / "f.png", tiny_checkpoint, "--window", window)
        assert result.exit_code == 2, window


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_absent_device_is_one_line(tmp_path: Path, tiny_checkpoint: Path) -> None:
    result = run("fuse", CT / "20010.png", MRI / "20010.png", "-o", tmp_path / "f.png",
                 "--weights", tiny_checkpoint, "--device", "cuda")  # fmt: skip
    assert_one_line_error(result, "--device cuda", "--device cpu")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("-o", "{tmp}/fused.jpg"), "-o {tmp}/fused.jpg: .jpg is not an output format"),
        (("-o", "{tmp}/fused"), "-o {tmp}/fused: the name has no suffix"),
        (("-o", "{tmp}"), "-o {tmp} is a folder; one pair writes one file"),
        (("-o", "{tmp}/a.png", "--save-warped", "{tmp}/a.png"), "--save-warped {tmp}/a.png is also the -o output"),
        (("-o", "{tmp}/a.png", "--save-flow", "{tmp}/f.txt"), "--save-flow {tmp}/f.txt: .txt is not an output format"),
    ],
)
def test_output_names_are_refused_before_any_work(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, extra: tuple[str, ...], needle: str
) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the network ran before the output names were checked")

    monkeypatch.setattr("bsafuse.api.fuse", no_work)
    args = [a.format(tmp=tmp_path) for a in extra]
    result = run("fuse", CT / "20010.png", MRI / "20010.png", "--weights", tiny_checkpoint, "--device", "cpu", *args)
    assert_one_line_error(result, needle.format(tmp=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written
