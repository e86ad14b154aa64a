"""DICOM: real files (pydicom, pydicom-data), a synthesised series, writing, and every refusal."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bsafuse.errors import InputError
from bsafuse.io import read_image, write_image

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
MR_SMALL = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
PATIENT = "Doe^Jane"  # planted in synthetic files: must never reach a message


def dicom_slice(
    path: Path,
    stored: np.ndarray,
    *,
    position: tuple[float, float, float] = (0.0, 0.0, 0.0),
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    spacing: tuple[float, float] = (0.5, 0.8),
    series: str = "1.2.3.4",
    modality: str = "MR",
    rescale: tuple[float, float] = (1.0, 0.0),
) -> Path:
    """A minimal single-frame grey DICOM written with pydicom (not with bsafuse)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT, "SECRET-ID-42", "19700101"
    ds.SeriesInstanceUID, ds.Modality = series, modality
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 1
    ds.ImagePositionPatient, ds.ImageOrientationPatient = list(position), list(orientation)
    ds.PixelSpacing, ds.SliceThickness = list(spacing), 2.0
    ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = stored.astype("<i2").tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def make_series(folder: Path, volume: np.ndarray, *, step: float = 2.0, series: str = "1.2.3.4") -> Path:
    """One file per slice, written in scrambled order with non-sorting names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = np.random.default_rng(len(volume)).permutation(len(volume))  # file order != position order
    for k, name in enumerate(names):
        position = (-10.0, 5.0, 30.0 + step * k)
        dicom_slice(folder / f"{series}-{name}.dcm", volume[k], position=position, series=series)
    return folder


# --- real files ---------------------------------------------------------------------------------


def test_ct_small_is_in_hounsfield_units() -> None:
    raw = pydicom.dcmread(CT_SMALL)
    assert (float(raw.RescaleSlope), float(raw.RescaleIntercept)) == (1.0, -1024.0)
    assert int(raw.pixel_array[64, 64]) == 1928  # stored value: 904 HU after rescaling
    wide = read_image(CT_SMALL, window=(0.0, 8192.0))
    assert wide.intensity.restore(wide.pixels[64, 64]) == pytest.approx(904.0, abs=0.01)
    default = read_image(CT_SMALL)  # brain-bone window, centre 100 HU, width 400 HU
    assert default.modality == "CT" and default.intensity.method == "window"
    hu = raw.pixel_array.astype(float) - 1024
    np.testing.assert_allclose(default.pixels, np.clip((hu + 100) / 400, 0, 1), atol=1e-6)


def test_ct_small_geometry_matches_simpleitk() -> None:
    image = read_image(CT_SMALL)
    reference = sitk.ReadImage(str(CT_SMALL))
    np.testing.assert_allclose(image.spacing[:2], reference.GetSpacing()[:2])
    np.testing.assert_allclose(image.origin, reference.GetOrigin())
    np.testing.assert_allclose(image.direction, reference.GetDirection(), atol=1e-6)


def test_mr_small_uses_percentiles() -> None:
    image = read_image(MR_SMALL)
    assert image.modality == "MR" and image.intensity.method == "percentile"
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0


def test_real_head_ct_from_pydicom_data() -> None:
    pytest.importorskip("data_store", reason="pydicom-data is not installed")
    path = get_testdata_file("693_UNCR.dcm", download=False)
    if path is None:
        pytest.skip("693_UNCR.dcm is not available offline")
    raw = pydicom.dcmread(path)
    image = read_image(path, window=(0.0, 8192.0))
    hu = raw.pixel_array * float(raw.RescaleSlope) + float(raw.RescaleIntercept)
    assert image.modality == "CT" and image.pixels.shape == (512, 512)
    np.testing.assert_allclose(image.intensity.restore(image.pixels), np.clip(hu, -4096, 4096), atol=0.01)


def test_palette_and_rgb_dicom_are_colour() -> None:
    palette = read_image(get_testdata_file("examples_palette.dcm"))  # type: ignore[arg-type]
    rgb = read_image(get_testdata_file("SC_rgb_small_odd.dcm"))  # type: ignore[arg-type]
    assert palette.is_colour and palette.pixels.shape[-1] == 3
    assert rgb.is_colour and rgb.pixels.shape == (3, 3, 3)


# --- series and multi-frame volumes -------------------------------------------------------------


def test_series_folder_is_a_sorted_volume(tmp_path: Path) -> None:
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) * 10
    folder = make_series(tmp_path / "series", volume)
    (folder / "README.txt").write_text("not DICOM")
    image = read_image(folder, window=(0.0, 10000.0))
    assert image.is_volume and image.pixels.shape == (4, 5, 6)
    np.testing.assert_allclose(image.intensity.restore(image.pixels), volume, atol=0.01)
    assert image.spacing == pytest.approx((0.8, 0.5, 2.0)) and image.origin == pytest.approx((-10, 5, 30))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    reference = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(reference), volume)
    np.testing.assert_allclose(image.spacing, reference.GetSpacing())
    np.testing.assert_allclose(image.origin, reference.GetOrigin())


def test_series_slice_index_counts_from_the_lowest_position(tmp_path: Path) -> None:
    volume = np.stack([np.full((3, 3), 100 * k, np.int16) for k in range(4)])
    image = read_image(make_series(tmp_path / "s", volume), slice_index=2, window=(0.0, 1000.0))
    assert image.pixels.shape == (3, 3)
    np.testing.assert_allclose(image.intensity.restore(image.pixels), 200.0, atol=1e-3)
    assert image.origin == pytest.approx((-10.0, 5.0, 34.0))


def test_two_series_in_one_folder_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    make_series(folder, np.zeros((3, 4, 4), np.int16), series="1.2.3.4")
    make_series(folder, np.zeros((2, 4, 4), np.int16), series="1.2.3.5")
    with pytest.raises(
        InputError, match=r"mixed holds 2 DICOM series.*1\.2\.3\.4: 3 files.*1\.2\.3\.5: 2 files.*own folder"
    ):
        read_image(folder)


def test_empty_folder_and_duplicate_positions_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty is a folder, and a folder stands for one DICOM series, but it is empty"):
        read_image(tmp_path / "empty")
    pngs = tmp_path / "x.png"  # a folder whose name looks like a file
    pngs.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(pngs / "a.png")
    with pytest.raises(InputError, match=r"x\.png is a folder.*holds 1 PNG/NIfTI file\(s\), not a DICOM series.*MOVING_DIR FIXED_DIR"):
        read_image(pngs)
    folder = make_series(tmp_path / "dup", np.zeros((2, 4, 4), np.int16), step=0.0)
    with pytest.raises(InputError, match="dup: several slices share one position"):
        read_image(folder)


def test_volume_written_as_multiframe_reads_back_everywhere(tmp_path: Path) -> None:
    volume = np.stack([np.full((5, 6), 100 * k, np.int16) + np.arange(6, dtype=np.int16) for k in range(3)])
    source = read_image(make_series(tmp_path / "s", volume), window=(0.0, 1000.0))
    out = write_image(tmp_path / "vol.dcm", source)
    back = read_image(out, window=(0.0, 1000.0))
    assert back.is_volume and back.pixels.shape == source.pixels.shape
    np.testing.assert_allclose(back.intensity.restore(back.pixels), volume, atol=0.01)
    np.testing.assert_allclose(back.spacing, source.spacing)
    np.testing.assert_allclose(back.origin, source.origin)
    reference = sitk.ReadImage(str(out))
    np.testing.assert_allclose(sitk.GetArrayFromImage(reference), volume)
    np.testing.assert_allclose(reference.GetSpacing(), source.spacing)
    np.testing.assert_allclose(reference.GetOrigin(), source.origin)


# --- writing ------------------------------------------------------------------------------------


def test_anonymized_output_is_a_new_study_with_no_patient_values(tmp_path: Path) -> None:
    from bsafuse.io.image import STUDY_TAGS

    ct = read_image(CT_SMALL)
    source = pydicom.dcmread(CT_SMALL)
    assert str(source.PatientName) and source.PatientID  # the control: the source has them
    ds = pydicom.dcmread(write_image(tmp_path / "anon.dcm", ct, like=ct, anonymize=True, description="x y"))
    assert ds.StudyInstanceUID != source.StudyInstanceUID
    assert ds.FrameOfReferenceUID != source.FrameOfReferenceUID
    assert all(str(ds.get(k, "")) == "" for k in STUDY_TAGS if k != "StudyDescription"), "patient module kept"
    assert ds.SeriesDescription == "x y"
    assert "PatientName" not in repr(ct) and str(source.PatientName) not in repr(ct)  # never shown


def test_written_slice_keeps_geometry_modality_and_hu(tmp_path: Path) -> None:
    ct = read_image(CT_SMALL)
    out = write_image(tmp_path / "fused.dcm", ct.pixels[::-1].copy(), like=ct)
    ds = pydicom.dcmread(out)
    source = pydicom.dcmread(CT_SMALL)
    assert ds.Modality == "CT"
    assert ds.SOPInstanceUID != source.SOPInstanceUID and ds.SeriesInstanceUID != source.SeriesInstanceUID
    # a derived series of the source's study: viewers overlay it on the source
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert str(ds.PatientName) == str(source.PatientName) and ds.PatientID == source.PatientID
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    back = read_image(out)
    np.testing.assert_allclose(back.pixels, ct.pixels[::-1], atol=1.5 / 400)  # 1 HU in a 400 HU window
    np.testing.assert_allclose(back.origin, ct.origin, atol=1e-5)
    np.testing.assert_allclose(back.spacing[:2], ct.spacing[:2], atol=1e-6)
    reference = sitk.ReadImage(str(out))  # SimpleITK agrees on geometry and values (in HU)
    np.testing.assert_allclose(reference.GetOrigin(), ct.origin, atol=1e-5)
    hu = ct.intensity.restore(ct.pixels[::-1])
    np.testing.assert_allclose(sitk.GetArrayFromImage(reference)[0], hu, atol=0.5)


def test_array_without_like_round_trips(tmp_path: Path) -> None:
    ramp = np.linspace(0, 1, 48, dtype=np.float32).reshape(6, 8)
    out = write_image(tmp_path / "ramp.dcm", ramp)
    ds = pydicom.dcmread(out)
    assert ds.Modality == "OT" and ds.BitsAllocated == 16
    back = read_image(out)
    np.testing.assert_allclose(back.pixels, ramp, atol=1 / 65535)


def test_colour_slice_round_trips(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3)).astype(np.float32) / 255
    back = read_image(write_image(tmp_path / "rgb.dcm", rgb))
    assert back.is_colour
    np.testing.assert_allclose(back.pixels, rgb, atol=1e-6)


# --- magic bytes --------------------------------------------------------------------------------


def test_dicom_named_png_or_without_suffix_is_read_as_dicom(tmp_path: Path) -> None:
    for name in ("scan.png", "IM0001"):
        shutil.copy(CT_SMALL, tmp_path / name)
        image = read_image(tmp_path / name)
        assert image.modality == "CT" and image.source_format == "dicom"


def test_bare_dataset_without_preamble(tmp_path: Path) -> None:
    path = dicom_slice(tmp_path / "bare.dcm", np.full((3, 3), 7, np.int16))
    ds = pydicom.dcmread(path)
    del ds.file_meta
    ds.preamble = None
    ds.save_as(tmp_path / "nometa.dcm", implicit_vr=True, little_endian=True)
    image = read_image(tmp_path / "nometa.dcm", window=(50.0, 100.0))
    np.testing.assert_allclose(image.pixels, 0.07, atol=1e-6)


# --- failures -----------------------------------------------------------------------------------


def test_compressed_without_decoder_names_the_extra() -> None:
    path = Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))  # type: ignore[arg-type]
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    from pydicom.pixels import get_decoder

    if get_decoder(syntax).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    with pytest.raises(
        InputError,
        match=r'MR_small_jpeg_ls_lossless\.dcm is compressed.*pip install "bsafuse\[dicom-codecs\]"',
    ):
        read_image(path)


def test_compressed_that_the_installed_decoder_cannot_read_names_the_extra() -> None:
    """12-bit JPEG Extended: Pillow is installed and claims the syntax, but cannot decode it."""
    path = Path(get_testdata_file("JPEG-lossy.dcm"))  # type: ignore[arg-type]
    try:
        pydicom.dcmread(path).pixel_array  # noqa: B018
        pytest.skip("a decoder that reads 12-bit JPEG Extended is installed here")
    except Exception:  # whatever the decoder raises (pytest.skip is not an Exception)
        pass
    with pytest.raises(InputError, match=r"JPEG-lossy\.dcm is compressed \(JPEG Extended.*bsafuse\[dicom-codecs\]") as info:
        read_image(path)
    assert "truncated" not in str(info.value)


def test_missing_pixel_data(tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_slice(tmp_path / "a.dcm", np.zeros((2, 2), np.int16)))
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(InputError, match=r"nopixels\.dcm holds no pixel data") as info:
        read_image(tmp_path / "nopixels.dcm")
    assert "Doe" not in str(info.value) and "SECRET" not in str(info.value)


@pytest.mark.parametrize("keep", [0.3, 0.97])
def test_truncated_dicom_never_leaks_patient_tags(tmp_path: Path, keep: float) -> None:
    data = dicom_slice(tmp_path / "full.dcm", np.ones((64, 64), np.int16)).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError, match=r"cut\.dcm") as info:
        read_image(cut)
    for secret in (PATIENT, "Doe", "SECRET-ID-42", "19700101"):
        assert secret not in str(info.value)


def test_non_dicom_named_dcm(tmp_path: Path) -> None:
    (tmp_path / "notes.dcm").write_bytes(b"just some text, no DICOM here at all" * 4)
    with pytest.raises(InputError, match=r"notes\.dcm"):
        read_image(tmp_path / "notes.dcm")


def test_slice_index_on_a_single_slice_is_refused() -> None:
    with pytest.raises(InputError, match=r"CT_small\.dcm is a single 2-D slice"):
        read_image(CT_SMALL, slice_index=0)


def test_oversized_dicom_is_refused_before_decoding(tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_slice(tmp_path / "a.dcm", np.zeros((2, 2), np.int16)))
    ds.Rows = 9000
    ds.save_as(tmp_path / "huge.dcm")
    with pytest.raises(InputError, match=r"huge\.dcm is 1 x 9000 x 2 pixels"):
        read_image(tmp_path / "huge.dcm")


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_slice(tmp_path / "a.dcm", np.array([[0, 50, 100]], np.int16)))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    image = read_image(tmp_path / "m1.dcm")
    np.testing.assert_allclose(image.pixels, [[1.0, 0.5, 0.0]])


def test_unrecognised_file_without_suffix_lists_formats(tmp_path: Path) -> None:
    (tmp_path / "IM0002").write_bytes(b"\x00\x01 random bytes that are no image" * 10)
    with pytest.raises(InputError, match=r"IM0002 is not a recognisable image.*\.png.*\.nii\.gz"):
        read_image(tmp_path / "IM0002")


def test_volume_option_is_for_nifti_only() -> None:
    with pytest.raises(
        InputError, match=r"volume=1 selects a volume of a 4-D NIfTI file.*CT_small\.dcm is DICOM"
    ):
        read_image(CT_SMALL, volume=1)


@pytest.mark.parametrize("window", [(40.0,), (40.0, 0.0), ("a", "b")])
def test_bad_window_is_refused(window: tuple) -> None:  # type: ignore[type-arg]
    with pytest.raises(InputError, match="window must be"):
        read_image(CT_SMALL, window=window)  # type: ignore[arg-type]


def test_sagittal_slice_of_a_series(tmp_path: Path) -> None:
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = read_image(make_series(tmp_path / "s", volume), slice_index=2, axis="x", window=(0.0, 1000.0))
    # superior (last slice) up, anterior (row 0) on the left
    np.testing.assert_allclose(image.intensity.restore(image.pixels), volume[::-1, :, 2], atol=0.01)
    assert image.spacing == pytest.approx((0.5, 2.0, 0.8))  # columns step rows (0.5 mm), rows step slices


def test_nifti_like_written_as_dicom_keeps_geometry(tmp_path: Path) -> None:
    import nibabel as nib

    affine = np.diag([0.8, 0.9, 2.0, 1.0])
    affine[:3, 3] = (-20, -30, 10)
    data = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3) * 7.5
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "mr.nii.gz")
    source = read_image(tmp_path / "mr.nii.gz")
    back = read_image(write_image(tmp_path / "mr.dcm", source))
    np.testing.assert_allclose(back.spacing, source.spacing, atol=1e-6)
    np.testing.assert_allclose(back.origin, source.origin, atol=1e-5)
    np.testing.assert_allclose(back.direction, source.direction, atol=1e-6)
    np.testing.assert_allclose(back.pixels, source.pixels, atol=2e-5)
    ds = pydicom.dcmread(tmp_path / "mr.dcm")  # float source: uint16 spanning its value range
    assert ds.BitsAllocated == 16 and ds.Modality == "OT"
    assert float(ds.RescaleSlope) == pytest.approx(float(data.max()) / 65535, rel=1e-9)
