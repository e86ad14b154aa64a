"""No patient data in anything bsafuse writes or says, and no local-variable dumps (issue 11).

DICOM inputs carry planted patient tags (name, ID, dates, accession number, institution; some in
forms pydicom's validation would complain about, quoting the value, if anything read them). After
successful and failing runs the planted values must appear in none of: stdout (the --json summary),
stderr (messages, the summary table), log records, Python warnings, and the written files (flow,
report panel). DICOM outputs are a derived series of the fixed image's study and carry its patient
module (so viewers overlay them on the MRI), unless --anonymize, which leaves nothing anywhere.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner, Result

from bsafuse.cli import app

NAME, ID = "Zyxwv^Qwerty", "PID-8675309-XQ" + "7" * 60  # the ID is too long for its VR (LO, 64)
DATES = {"StudyDate": "19310417", "PatientBirthDate": "19020305", "SeriesDate": "1931-04-18"}  # last: bad DA
OTHER = {"AccessionNumber": "ACC55501", "InstitutionName": "Mercy Hill Clinic"}
STUDY_UID, FRAME_UID = generate_uid(), generate_uid()
SECRETS = [NAME, "Zyxwv", "Qwerty", ID[:14], *DATES.values(), "1931-04-17", *OTHER.values()]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny network is much faster single-threaded on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def patient_dicom(path: Path, modality: str, *, shift: float = 0.0, series: str | None = None) -> Path:
    """A 64 x 64 slice that carries the planted patient tags."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.4")  # MR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the planted ID and SeriesDate are invalid on purpose
        ds.PatientName, ds.PatientID = NAME, ID
        for keyword, value in {**DATES, **OTHER}.items():
            setattr(ds, keyword, value)
    ds.Modality, ds.SeriesInstanceUID = modality, series or generate_uid()
    ds.StudyInstanceUID, ds.FrameOfReferenceUID = STUDY_UID, FRAME_UID  # one study: CT and MR overlap
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 1
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [-25.0, -25.0, 10.0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 2.0
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0 if modality == "CT" else 0.0
    ys, xs = np.mgrid[0:64, 0:64]
    r2 = ((xs - 32 - shift) / 20) ** 2 + ((ys - 32) / 22) ** 2
    ds.PixelData = (np.clip(1.2 - r2, 0, 1) * 1200 + 900).astype("<i2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def patient_pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(moving CT, fixed MR, output folder): one study, both slices carrying the planted tags."""
    ct = patient_dicom(tmp_path / "in" / "ct.dcm", "CT", shift=3)
    return ct, patient_dicom(tmp_path / "in" / "mr.dcm", "MR"), tmp_path / "out"


def run_cli(args: list[object], caplog: pytest.LogCaptureFixture) -> tuple[Result, str]:
    """Run bsafuse in-process; return the result and everything else it said (logs, warnings)."""
    caplog.set_level(logging.DEBUG)  # every logger, pydicom's included
    caplog.clear()  # making the inputs logged pydicom's complaints about the planted values
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, [str(a) for a in args])
    return result, caplog.text + "\n".join(str(w.message) for w in caught)


def assert_no_secrets(*texts: str | bytes) -> None:
    for text in texts:
        blob = text if isinstance(text, bytes) else text.encode()
        for secret in SECRETS:
            assert secret.encode() not in blob, f"{secret!r} leaked"


def written_bytes(path: Path) -> bytes:
    """Every file under `path` (or the file itself), gzip-decompressed where it is gzip (flow .nii.gz)."""
    out = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        data = file.read_bytes()
        out.append(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    return b"".join(out)


def fuse_args(moving: Path, fixed: Path, output: Path, ckpt: Path, *extra: object) -> list[object]:
    return ["fuse", moving, fixed, "-o", output, "--weights", ckpt, "--device", "cpu", *extra]


def test_planted_tags_are_really_in_the_inputs(tmp_path: Path) -> None:
    """The control: the scan finds the planted values where they are."""
    path = patient_dicom(tmp_path / "ct.dcm", "CT")
    with pytest.raises(AssertionError, match="leaked"):
        assert_no_secrets(path.read_bytes())


def test_successful_run_leaks_no_patient_tags(
    tmp_path: Path, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ct, mr, out = patient_pair(tmp_path)
    result, said = run_cli(fuse_args(ct, mr, out / "fused.dcm", tiny_checkpoint, "--json",
                                     "--report", out / "report.png", "--save-warped", out / "warped.dcm",
                                     "--save-flow", out / "flow.nii.gz"), caplog)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] == 1
    assert {p.name for p in out.iterdir()} == {"fused.dcm", "warped.dcm", "flow.nii.gz", "report.png"}
    # The DICOM outputs are a derived series of the MR's study: its patient module, its study and
    # frame of reference (so a viewer overlays them); nothing else carries patient data.
    for name in ("fused.dcm", "warped.dcm"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the planted ID is too long for its VR, on purpose
            ds = pydicom.dcmread(out / name)
            ds.PatientID  # noqa: B018  (decoded here, where its complaint is silenced)
        assert str(ds.PatientName) == NAME and ds.PatientID == ID and ds.StudyDate == DATES["StudyDate"]
        assert (ds.StudyInstanceUID, ds.FrameOfReferenceUID) == (STUDY_UID, FRAME_UID)
        assert ds.SeriesInstanceUID not in (pydicom.dcmread(mr).SeriesInstanceUID, pydicom.dcmread(ct).SeriesInstanceUID)
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and "bsafuse" in ds.SeriesDescription
        assert "InstitutionName" not in ds  # only the patient and study modules are copied
    others = [p for p in sorted(out.iterdir()) if p.suffix != ".dcm"]
    assert_no_secrets(result.stdout, result.stderr, said, *(written_bytes(p) for p in others))


def test_anonymized_run_leaks_no_patient_tags_anywhere(
    tmp_path: Path, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ct, mr, out = patient_pair(tmp_path)
    result, said = run_cli(fuse_args(ct, mr, out / "fused.dcm", tiny_checkpoint, "--json", "--anonymize",
                                     "--save-warped", out / "warped.dcm"), caplog)  # fmt: skip
    assert result.exit_code == 0, result.output
    fused = pydicom.dcmread(out / "fused.dcm")
    assert str(fused.PatientName) == "" and fused.PatientID == "" and fused.StudyDate == ""
    assert fused.StudyInstanceUID != STUDY_UID and fused.FrameOfReferenceUID != FRAME_UID
    assert_no_secrets(result.stdout, result.stderr, said, written_bytes(out))


def test_failing_runs_leak_no_patient_tags(
    tmp_path: Path, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mr = patient_dicom(tmp_path / "mr.dcm", "MR")
    truncated = tmp_path / "cut.dcm"
    truncated.write_bytes(patient_dicom(tmp_path / "full.dcm", "CT").read_bytes()[:-3000])
    no_pixels = pydicom.dcmread(patient_dicom(tmp_path / "np.dcm", "CT"))
    del no_pixels.PixelData
    no_pixels.save_as(tmp_path / "nopixels.dcm")
    damaged = pydicom.dcmread(patient_dicom(tmp_path / "dm.dcm", "CT"))
    damaged.add_new(0x00280030, "LO", "wide\\open")  # PixelSpacing as text
    damaged.save_as(tmp_path / "damaged.dcm")
    for k, series in enumerate(("1.2.3.1", "1.2.3.2")):
        patient_dicom(tmp_path / "two" / f"s{k}.dcm", "CT", series=series)
    cases = [(truncated, mr), (tmp_path / "nopixels.dcm", mr), (tmp_path / "damaged.dcm", mr),
             (tmp_path / "two", tmp_path / "two")]  # fmt: skip
    for moving, fixed in cases:
        args = fuse_args(moving, fixed, tmp_path / "out" / "f.dcm", tiny_checkpoint, "--json")
        result, said = run_cli(args, caplog)
        assert result.exit_code == 1 and result.stderr.startswith("error:"), result.output
        assert moving.name in result.stderr
        assert_no_secrets(result.stdout, result.stderr, said)
    assert not (tmp_path / "out").exists()


def test_folder_run_summary_and_json_leak_no_patient_tags(
    tmp_path: Path, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    moving, fixed, out = tmp_path / "ct", tmp_path / "mr", tmp_path / "out"
    patient_dicom(moving / "good.dcm", "CT", shift=2)
    patient_dicom(fixed / "good.dcm", "MR")
    (moving / "bad.dcm").write_bytes(patient_dicom(tmp_path / "b.dcm", "CT").read_bytes()[:-3000])
    patient_dicom(fixed / "bad.dcm", "MR")
    result, said = run_cli(fuse_args(moving, fixed, out, tiny_checkpoint, "--json"), caplog)
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert (summary["ok"], summary["failed"]) == (1, 1)
    assert "bad.dcm" in result.stderr and "failed pairs" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["good.dcm"]  # a derived series of good.dcm's study
    assert_no_secrets(result.stdout, result.stderr, said)


# ------------------------------------------------------------------ tracebacks show no locals

CRASH = """
import sys
import bsafuse.cli.fuse as command
from bsafuse.cli import app

def run_command(*args, **kwargs):
    patient_name = "Zyx" + "wv^Qwerty"  # a local holding patient data when the bug strikes
    raise RuntimeError("an unexpected bug")

command.run_command = run_command
app.pretty_exceptions_show_locals = sys.argv[1] == "show"
app(prog_name="bsafuse", args=["fuse", sys.argv[2], sys.argv[2], "-o", sys.argv[3]])
"""


def crash(tmp_path: Path, mode: str) -> str:
    env = {k: v for k, v in os.environ.items() if "TYPER_STANDARD_TRACEBACK" not in k}
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    done = subprocess.run(
        [sys.executable, "-c", CRASH, mode, str(image), str(tmp_path / "out.png")],
        env={**env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert "RuntimeError" in done.stderr and "an unexpected bug" in done.stderr  # a bug keeps its traceback
    return done.stderr


def test_pretty_exceptions_do_not_show_locals(tmp_path: Path) -> None:
    assert app.pretty_exceptions_show_locals is False
    assert "Zyxwv" not in crash(tmp_path, "hide")
    assert "Zyxwv^Qwerty" in crash(tmp_path, "show")  # the control: with locals on, it would leak
