"""NIfTI: affine and shape round trips, the slice/axis convention, 4-D files, bad files."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from bsafuse.errors import InputError, OutputError
from bsafuse.io import read_image, write_image

RAS_AFFINE = np.array(  # 0.9 x 1.1 x 2.5 mm, stored RAS (nibabel's canonical order), offset origin
    [[0.9, 0.0, 0.0, -30.5], [0.0, 1.1, 0.0, -40.25], [0.0, 0.0, 2.5, 12.0], [0.0, 0.0, 0.0, 1.0]]
)


def volume(shape: tuple[int, ...] = (6, 5, 4)) -> np.ndarray:
    """Distinct, exactly representable values: voxel (i, j, k) holds 100 i + 10 j + k."""
    i, j, k = np.indices(shape[:3])
    data = 100 * i + 10 * j + k
    return data.astype(np.float32).reshape(shape[:3] + (1,) * (len(shape) - 3)) * np.ones(shape, np.float32)


def save(path: Path, data: np.ndarray, affine: np.ndarray = RAS_AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def values(image) -> np.ndarray:  # type: ignore[no-untyped-def]
    return image.intensity.restore(image.pixels)


WIDE = (0.0, 2000.0)  # a window that keeps every test value (< 1000) linear


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_3d_round_trip_keeps_affine_shape_and_values(tmp_path: Path, suffix: str) -> None:
    data = volume()
    image = read_image(save(tmp_path / f"in{suffix}", data), window=WIDE)
    assert image.is_volume and image.pixels.shape == (4, 5, 6)  # (D, H, W) = (k, j, i)
    assert np.array_equal(image.affine, nib.load(tmp_path / f"in{suffix}").affine)
    out = nib.load(write_image(tmp_path / f"out{suffix}", image))
    assert out.shape == data.shape and out.get_data_dtype() == np.float32
    assert np.array_equal(out.affine, nib.load(tmp_path / f"in{suffix}").affine)  # bit for bit
    np.testing.assert_allclose(out.get_fdata(), data, atol=1e-3)


def test_2d_round_trip(tmp_path: Path) -> None:
    data = volume((7, 3, 1))[..., 0]
    path = save(tmp_path / "flat.nii.gz", data)
    image = read_image(path, window=WIDE)
    assert image.pixels.shape == (3, 7) and not image.is_volume
    out = nib.load(write_image(tmp_path / "out.nii.gz", image))
    assert out.shape == (7, 3) and np.array_equal(out.affine, nib.load(path).affine)
    np.testing.assert_allclose(out.get_fdata(), data, atol=1e-3)


def test_axial_slice_convention_for_a_ras_file(tmp_path: Path) -> None:
    """axis z, index k is dataobj[:, :, k] transposed and flipped: anterior up, patient left on the right."""
    data = volume()
    image = read_image(save(tmp_path / "ras.nii.gz", data), slice_index=1, axis="z", window=WIDE)
    np.testing.assert_allclose(values(image), data[:, :, 1].T[::-1, ::-1], atol=1e-3)
    # geometry pinned too: pixel (column c, row r) lies where file voxel (5 - c, 4 - r, 1) does
    world = image.index_to_world() @ [2, 3, 0, 1]
    ras = RAS_AFFINE @ [5 - 2, 4 - 3, 1, 1]
    np.testing.assert_allclose(world[:3], ras[:3] * [-1, -1, 1])


def test_coronal_and_sagittal_have_superior_up(tmp_path: Path) -> None:
    data = volume()
    path = save(tmp_path / "ras.nii.gz", data)
    coronal = read_image(path, slice_index=2, axis="y", window=WIDE)
    sagittal = read_image(path, slice_index=3, axis="x", window=WIDE)
    np.testing.assert_allclose(values(coronal), data[::-1, 2, ::-1].T, atol=1e-3)  # rows: S->I, columns: R->L
    np.testing.assert_allclose(
        values(sagittal), data[3, ::-1, ::-1].T, atol=1e-3
    )  # rows: S->I, columns: A->P


def test_lps_stored_file_is_shown_as_stored(tmp_path: Path) -> None:
    lps = RAS_AFFINE @ np.diag([-1.0, -1.0, 1.0, 1.0])  # i toward left, j toward posterior
    data = volume()
    image = read_image(save(tmp_path / "lps.nii", data, lps), slice_index=0, window=WIDE)
    np.testing.assert_allclose(values(image), data[:, :, 0].T, atol=1e-3)


def test_volume_geometry_matches_simpleitk(tmp_path: Path) -> None:
    path = save(tmp_path / "v.nii.gz", volume())
    image = read_image(path, window=WIDE)
    reference = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")  # ITK's name for this order
    np.testing.assert_allclose(image.spacing, reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(image.origin, reference.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(image.direction, reference.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(values(image), sitk.GetArrayFromImage(reference), atol=1e-3)


def test_slice_is_written_back_in_place(tmp_path: Path) -> None:
    data = volume()
    path = save(tmp_path / "v.nii.gz", data)
    image = read_image(path, slice_index=2, axis="z", window=WIDE)
    out = nib.load(write_image(tmp_path / "slice.nii.gz", image))
    assert out.shape == (6, 5, 1)
    np.testing.assert_allclose(out.get_fdata(), data[:, :, 2:3], atol=1e-3)
    np.testing.assert_allclose(out.affine @ [0, 0, 0, 1], RAS_AFFINE @ [0, 0, 2, 1])


def test_percentile_round_trip_is_stable(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(300, 80, (16, 16, 8)).astype(np.float32)
    image = read_image(save(tmp_path / "mr.nii.gz", data))
    assert image.intensity.method == "percentile"
    again = read_image(write_image(tmp_path / "again.nii.gz", image))
    np.testing.assert_allclose(again.pixels, image.pixels, atol=1e-5)


def test_4d_needs_a_volume_index(tmp_path: Path) -> None:
    path = save(tmp_path / "bold.nii.gz", volume((4, 3, 2, 5)) + np.arange(5, dtype=np.float32))
    with pytest.raises(InputError, match=r"bold\.nii\.gz is 4-D.*volume=N.*0 to 4"):
        read_image(path)
    third = read_image(path, volume=3, window=WIDE)
    np.testing.assert_allclose(
        values(third), volume((4, 3, 2)).transpose(2, 1, 0)[:, ::-1, ::-1] + 3, atol=1e-3
    )
    with pytest.raises(InputError, match="volume 7 is outside"):
        read_image(path, volume=7)


def test_4d_with_one_volume_reads_as_3d(tmp_path: Path) -> None:
    image = read_image(save(tmp_path / "one.nii", volume((4, 3, 2, 1))))
    assert image.pixels.shape == (2, 3, 4)


def test_nan_is_refused(tmp_path: Path) -> None:
    data = volume()
    data[1, 1, 1] = np.nan
    with pytest.raises(InputError, match=r"nan\.nii\.gz holds 1 NaN or infinite voxels"):
        read_image(save(tmp_path / "nan.nii.gz", data))


def test_slice_index_out_of_range(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"slice_index 9 is outside .*v\.nii: it has 4 slices along axis z"):
        read_image(save(tmp_path / "v.nii", volume()), slice_index=9)


def test_bad_axis(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="axis must be 'x', 'y' or 'z'"):
        read_image(save(tmp_path / "v.nii", volume()), slice_index=0, axis="k")


@pytest.mark.parametrize("keep", [0.1, 0.6])
def test_truncated_files(tmp_path: Path, keep: float) -> None:
    full = save(tmp_path / "full.nii.gz", volume((20, 20, 20))).read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(full[: int(len(full) * keep)])
    with pytest.raises(InputError, match=r"cut\.nii\.gz"):
        read_image(tmp_path / "cut.nii.gz")
    raw = gzip.decompress(full)
    (tmp_path / "cut.nii").write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(InputError, match=r"cut\.nii"):
        read_image(tmp_path / "cut.nii")


def test_non_nifti_named_nii(tmp_path: Path) -> None:
    (tmp_path / "fake.nii").write_bytes(b"\0" * 400)
    with pytest.raises(InputError, match=r"fake\.nii"):
        read_image(tmp_path / "fake.nii")


def test_colour_cannot_be_nifti(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="colour"):
        write_image(tmp_path / "rgb.nii.gz", np.zeros((4, 4, 3), np.float32))


def test_shape_must_match_like(tmp_path: Path) -> None:
    like = read_image(save(tmp_path / "v.nii", volume()))
    with pytest.raises(InputError, match=r"shape \(2, 2\).*resample"):
        write_image(tmp_path / "out.nii", np.zeros((2, 2), np.float32), like=like)


def test_colour_to_nifti_is_refused_naming_the_output_and_writing_nothing(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    out = tmp_path / "fused.nii.gz"
    with pytest.raises(OutputError, match=r"cannot write colour to NIfTI \(.*fused\.nii\.gz\)"):
        write_image(out, rgb)
    assert list(tmp_path.iterdir()) == []


def test_nan_affine_is_refused_at_reading_without_warnings(tmp_path: Path) -> None:
    """A header whose sform holds NaN: refused by the reader, before any work, with no numpy warning."""
    import warnings

    good = nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4))
    header = good.header
    header["srow_x"] = [np.nan, 0, 0, 0]
    header["sform_code"], header["qform_code"] = 1, 0
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), None, header=header), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a leaked RuntimeWarning would fail here
        with pytest.raises(InputError, match=r"nan\.nii\.gz: its affine \(sform/qform\) holds NaN"):
            read_image(path)
