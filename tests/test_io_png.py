"""PNG reading and writing: bit depths, colour modes, refusals, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bsafuse.errors import InputError, OutputError
from bsafuse.io import MedicalImage, read_image, write_image
from bsafuse.io.atomic import atomic_path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path)
    return path


def test_8bit_grey_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    levels = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    image = read_image(save(tmp_path / "grey.png", levels))
    assert image.pixels.dtype == np.float32 and image.pixels.shape == (20, 30)
    assert not image.is_colour and not image.is_volume and image.bit_depth == 8
    np.testing.assert_array_equal(image.pixels, levels.astype(np.float32) / 255)
    out = write_image(tmp_path / "out.png", image)
    assert np.array_equal(np.asarray(Image.open(out)), levels)
    assert image.spacing == (1.0, 1.0, 1.0) and image.modality is None


def test_16bit_grey_round_trip_stays_16bit(tmp_path: Path, rng: np.random.Generator) -> None:
    levels = rng.integers(0, 65536, (17, 9), dtype=np.uint16)
    image = read_image(save(tmp_path / "deep.png", levels))
    assert image.bit_depth == 16 and image.source_dtype == "uint16"
    np.testing.assert_allclose(image.pixels, levels / 65535, atol=1e-7)
    out = write_image(tmp_path / "out.png", image.pixels, like=image)
    with Image.open(out) as reread:
        assert reread.mode.startswith("I")
        assert np.array_equal(np.asarray(reread).astype(np.uint16), levels)


def test_arrays_are_written_as_8bit_by_default(tmp_path: Path) -> None:
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    with Image.open(write_image(tmp_path / "ramp.png", ramp)) as out:
        assert out.mode == "L"
        np.testing.assert_array_equal(np.asarray(out), np.rint(ramp * 255).astype(np.uint8))


def test_rgb_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    rgb = rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)
    image = read_image(save(tmp_path / "pet.png", rgb))
    assert image.is_colour and image.pixels.shape == (12, 14, 3) and image.shape == (12, 14)
    out = write_image(tmp_path / "out.png", image)
    with Image.open(out) as reread:
        assert reread.mode == "RGB" and np.array_equal(np.asarray(reread), rgb)


def test_rgba_drops_alpha(tmp_path: Path, rng: np.random.Generator) -> None:
    rgba = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    image = read_image(save(tmp_path / "rgba.png", rgba))
    assert image.is_colour
    np.testing.assert_array_equal(image.pixels, rgba[..., :3] / np.float32(255))


def test_palette_becomes_rgb(tmp_path: Path) -> None:
    palette = Image.new("P", (2, 2))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.putdata([0, 1, 2, 1])
    palette.save(tmp_path / "palette.png")
    image = read_image(tmp_path / "palette.png")
    assert image.is_colour
    np.testing.assert_array_equal(image.pixels[0, 0], [1, 0, 0])
    np.testing.assert_array_equal(image.pixels[0, 1], [0, 1, 0])
    np.testing.assert_array_equal(image.pixels[1, 0], [0, 0, 1])


@pytest.mark.parametrize("mode", ["LA", "1"])
def test_grey_with_alpha_and_bilevel_read_as_grey(tmp_path: Path, mode: str) -> None:
    levels = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    image = read_image(save(tmp_path / "x.png", levels, mode))
    assert not image.is_colour and image.pixels.shape == (2, 2)
    np.testing.assert_array_equal(image.pixels, levels / np.float32(255))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_grey_stored_with_equal_colour_channels_is_grey(tmp_path: Path, mode: str) -> None:
    levels = np.array([[0, 37, 255], [128, 5, 200]], dtype=np.uint8)

    def saved(name: str, palette: list[int]) -> Path:
        if mode != "P":
            rgb = np.asarray(palette, np.uint8).reshape(-1, 3)[levels]
            return save(tmp_path / name, rgb, mode)
        image = Image.fromarray(levels, "P")  # pixel values index a 256-entry palette
        image.putpalette(palette)
        image.save(tmp_path / name)
        return tmp_path / name

    grey_ramp = [v for i in range(256) for v in (i, i, i)]
    image = read_image(saved("g.png", grey_ramp))
    assert not image.is_colour and image.pixels.shape == (2, 3)
    np.testing.assert_array_equal(image.pixels, levels / np.float32(255))
    tinted = [v for i in range(256) for v in (i, i, i // 2)]  # one channel differs: colour
    assert read_image(saved("c.png", tinted)).is_colour


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_window_on_a_grey_png_is_refused(tmp_path: Path, dtype: type) -> None:
    levels = np.array([[0, 100, 200]], dtype=dtype)
    path = save(tmp_path / "w.png", levels)
    with pytest.raises(InputError, match=r"w\.png is a (8|16)-bit PNG of display grey levels, not Hounsfield"):
        read_image(path, window=(100, 100))


def test_png_named_dcm_is_read_as_png(tmp_path: Path) -> None:
    target = tmp_path / "disguised.dcm"
    Image.fromarray(np.full((4, 4), 51, dtype=np.uint8)).save(target, format="PNG")
    image = read_image(target)
    assert image.source_format == "png"
    np.testing.assert_allclose(image.pixels, 0.2)


def test_real_harvard_pair(harvard: Path) -> None:
    ct = read_image(next((harvard / "CT-MRI" / "CT").glob("*.png")))
    pet = read_image(next((harvard / "PET-MRI" / "PET").glob("*.png")))
    assert ct.pixels.shape == (256, 256) and not ct.is_colour
    assert pet.pixels.shape == (256, 256, 3) and pet.is_colour


# --- failures: every one names the file ---------------------------------------------------------


def test_truncated_png(tmp_path: Path, rng: np.random.Generator) -> None:
    full = save(tmp_path / "full.png", rng.integers(0, 256, (64, 64), dtype=np.uint8)).read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(InputError, match=r"cut\.png"):
        read_image(cut)


@pytest.mark.parametrize(("name", "content"), [("empty.png", b""), ("text.png", b"hello, not an image")])
def test_empty_or_non_image_png(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=name.replace(".", r"\.")):
        read_image(tmp_path / name)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nowhere\.png does not exist"):
        read_image(tmp_path / "nowhere.png")


def test_unknown_suffix_lists_supported(tmp_path: Path) -> None:
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(InputError, match=r"photo\.jpg.*\.png.*\.dcm.*\.nii\.gz"):
        read_image(tmp_path / "photo.jpg")
    with pytest.raises(OutputError, match=r"out\.jpg.*\.png, \.dcm, \.nii, \.nii\.gz"):
        write_image(tmp_path / "out.jpg", np.zeros((2, 2), np.float32))


def test_oversized_png_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(tmp_path / "wide.png", np.zeros((1, 8193), dtype=np.uint8))

    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("decoded an oversized image")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with pytest.raises(InputError, match=r"wide\.png is 1 x 8193 pixels.*8192"):
        read_image(tmp_path / "wide.png")


def test_slice_index_on_png_is_refused(tmp_path: Path) -> None:
    path = save(tmp_path / "flat.png", np.zeros((3, 3), np.uint8))
    with pytest.raises(InputError, match=r"flat\.png is a 2-D PNG"):
        read_image(path, slice_index=0)


def test_window_on_colour_is_refused(tmp_path: Path) -> None:
    colour = np.zeros((3, 3, 3), np.uint8)
    colour[0, 0] = (200, 10, 10)  # not grey: equal channels would make it a grey image
    path = save(tmp_path / "rgb.png", colour)
    with pytest.raises(InputError, match=r"rgb\.png is a colour image; a window applies to CT in HU"):
        read_image(path, window=(40, 400))


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((4, 4), 1.5, np.float32), r"\[0, 1\]"),
        (np.array([[0.0, np.nan]], np.float32), "NaN"),
        (np.zeros((4,), np.float32), "shape"),
    ],
)
def test_bad_arrays_are_refused(tmp_path: Path, array: np.ndarray, message: str) -> None:
    with pytest.raises(InputError, match=message):
        write_image(tmp_path / "bad.png", array)
    assert not list(tmp_path.iterdir())


def test_volume_cannot_be_a_png(tmp_path: Path) -> None:
    volume = MedicalImage(pixels=np.zeros((3, 4, 5), np.float32))
    with pytest.raises(InputError, match="volume of 3 slices"):
        write_image(tmp_path / "vol.png", volume)
    assert not list(tmp_path.iterdir())  # nothing left behind, not even the temporary file


# --- atomic writes ------------------------------------------------------------------------------


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "keep.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_atomic_write_creates_folders_and_keeps_suffix(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "out.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    assert [p.name for p in target.parent.iterdir()] == ["out.nii.gz"]


def test_unwritable_target_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(OutputError, match="cannot write"):
        write_image(blocker / "out.png", np.zeros((2, 2), np.float32))


def test_medical_image_names_its_file_when_invalid() -> None:
    with pytest.raises(InputError, match=r"scan\.png holds 1 NaN or infinite values"):
        MedicalImage(pixels=np.array([[0.0, np.inf]], np.float32), path=Path("scan.png"))


def test_float_rounding_just_outside_the_range_is_clipped() -> None:
    image = MedicalImage(pixels=np.array([[-1e-8, 1.0 + 1e-7]], np.float32))
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0
