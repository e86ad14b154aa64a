"""bsafuse.data: folder layout, case-wise split, preloading, on-the-fly misalignment, seeding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bsafuse import data
from bsafuse.deform import DeformParams
from bsafuse.errors import InputError
from bsafuse.warp import warp
from bsafuse.working_size import to_working


def _blob(size: int, seed: int) -> np.ndarray:
    """A smooth random grey image with structure (so deformations show)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((size // 8, size // 8))
    image = np.kron(coarse, np.ones((8, 8)))
    yy, xx = np.mgrid[:size, :size] / size
    return (0.5 * image + 0.5 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 8)).clip(0, 1)


def make_folder(
    root: Path, names: list[str], *, size: int = 32, moving: str = "CT", colour: bool = False
) -> Path:
    (root / "MRI").mkdir(parents=True)
    (root / moving).mkdir()
    for i, name in enumerate(names):
        fixed = (_blob(size, i) * 255).astype(np.uint8)
        Image.fromarray(fixed, "L").save(root / "MRI" / f"{name}.png")
        mov = (_blob(size, 100 + i) * 255).astype(np.uint8)
        if colour:
            rgb = np.stack([mov, (mov * 0.5).astype(np.uint8), 255 - mov], axis=-1)
            Image.fromarray(rgb, "RGB").save(root / moving / f"{name}.png")
        else:
            Image.fromarray(mov, "L").save(root / moving / f"{name}.png")
    return root


def _pairset(n: int = 4, size: int = 32) -> data.PairSet:
    moving = torch.stack([torch.from_numpy(_blob(size, i)).float() for i in range(n)])[:, None]
    fixed = moving.flip(-1) * 0.5  # a different image, in a known relation to the moving one
    return data.PairSet(tuple(f"{i + 1}00{i}" for i in range(n)), moving, fixed, "CT")


# ---------------------------------------------------------------- names and split
@pytest.mark.parametrize(
    ("name", "case"),
    [("16003", "16"), ("2004", "2"), ("20022", "20"), ("16003_t1", "16"), ("brain", "brain")],
)
def test_case_of_reads_case_and_three_digit_slice(name: str, case: str) -> None:
    assert data.case_of(name) == case


def test_split_by_named_cases_keeps_whole_cases_apart() -> None:
    names = ["16003", "16004", "20005", "2004", "2006", "21004"]
    train, val = data.split_by_case(names, val_cases=["16", "020"])
    assert val == ["16003", "16004", "20005"]
    assert train == ["2004", "2006", "21004"]


def test_split_refuses_unknown_cases_and_an_empty_training_set() -> None:
    names = ["16003", "20005"]
    with pytest.raises(InputError, match=r"--val-cases 7: no such case .*cases: 16, 20"):
        data.split_by_case(names, val_cases=["7"])
    with pytest.raises(InputError, match="leave at least one case for training"):
        data.split_by_case(names, val_cases=["16", "20"])


def test_split_by_fraction_is_seeded_and_case_wise() -> None:
    names = [f"{case}{s:03d}" for case in (2, 16, 20, 21, 32, 33, 34, 41) for s in range(3)]
    a = data.split_by_case(names, val_fraction=0.25, seed=3)
    assert a == data.split_by_case(names, val_fraction=0.25, seed=3)
    assert {data.case_of(n) for n in a[1]}.isdisjoint({data.case_of(n) for n in a[0]})
    assert len({data.case_of(n) for n in a[1]}) == 2
    assert data.split_by_case(names, val_fraction=0.0)[1] == []


# ---------------------------------------------------------------- folders
def test_layout_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="has no MRI/ folder"):
        data.find_pair_folder(tmp_path)
    (tmp_path / "MRI").mkdir()
    (tmp_path / "CT").mkdir()
    (tmp_path / "PET").mkdir()
    with pytest.raises(InputError, match=r"exactly one moving-modality folder .*CT, PET"):
        data.find_pair_folder(tmp_path)
    assert data.find_pair_folder(tmp_path, "ct-mri")[0].name == "CT"


def test_pair_option_picks_a_pair_folder(tmp_path: Path) -> None:
    make_folder(tmp_path / "CT-MRI", ["16003"])
    moving, fixed = data.find_pair_folder(tmp_path, "ct-mri")
    assert (moving.name, fixed.name) == ("CT", "MRI")


def test_load_pairs_preloads_grey_and_converts_colour_to_y(tmp_path: Path) -> None:
    root = make_folder(tmp_path, ["16003", "16004"], size=32, moving="PET", colour=True)
    moving_dir, fixed_dir = data.find_pair_folder(root)
    names = data.list_pairs(moving_dir, fixed_dir)
    pairs = data.load_pairs(moving_dir, fixed_dir, names, image_size=16)
    assert pairs.moving.shape == pairs.fixed.shape == (2, 1, 16, 16)
    assert pairs.modality == "PET"
    rgb = np.asarray(Image.open(root / "PET" / "16003.png"), dtype=np.float64) / 255
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]  # BT.601 luma
    expected = to_working(torch.from_numpy(y).float()[None, None], 16)[0, 0]  # as inference does
    torch.testing.assert_close(pairs.moving[0, 0], expected, atol=2e-3, rtol=0)


def test_non_square_images_are_padded_not_stretched() -> None:
    image = torch.ones(1, 1, 8, 16)
    out = to_working(image, 16)[0, 0]
    assert out.shape == (16, 16)
    assert out[:4].sum() == 0 and out[12:].sum() == 0 and out[4:12].min() == 1


# ---------------------------------------------------------------- misalignment
def test_items_come_from_seed_epoch_and_index_only() -> None:
    ds = data.MisalignedPairs(_pairset(), params=DeformParams.training(), seed=5, train=True)
    a, b = ds[(2, 1)], ds[(2, 1)]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert not torch.equal(ds[(3, 1)]["flow"], a["flow"])  # a fresh field every epoch
    other = data.MisalignedPairs(_pairset(), params=DeformParams.training(), seed=6, train=True)
    assert not torch.equal(other[(2, 1)]["flow"], a["flow"])


def test_validation_items_are_fixed_and_not_augmented() -> None:
    pairs = _pairset()
    ds = data.MisalignedPairs(pairs, params=DeformParams.training(), seed=5, train=False)
    assert torch.equal(ds[(0, 2)]["flow"], ds[(7, 2)]["flow"])
    assert torch.equal(ds[(4, 2)]["label"], pairs.moving[2]) and torch.equal(
        ds[(4, 2)]["fixed"], pairs.fixed[2]
    )


def test_curriculum_grows_the_training_deformation_and_leaves_validation_alone() -> None:
    """ramp_epochs = 4: epoch e (from 0) draws the same field as amplitudes times (e + 1) / 4."""
    params = DeformParams(rotate_deg=6, translate_px=8, scale=0.04, elastic_px=2)
    ramped = data.MisalignedPairs(_pairset(size=64), params=params, seed=3, train=True, ramp_epochs=4)
    plain = data.MisalignedPairs(_pairset(size=64), params=params, seed=3, train=True)
    for epoch, factor in ((0, 0.25), (2, 0.75)):
        quarter = data.MisalignedPairs(
            _pairset(size=64), params=params.scaled_by(factor), seed=3, train=True
        )
        for index in range(4):
            flow = ramped[(epoch, index)]["flow"]
            torch.testing.assert_close(flow, quarter[(epoch, index)]["flow"], rtol=0, atol=0)
            bound = params.scaled_by(factor).max_displacement_px(64, 64)
            assert flow.norm(dim=0).max() <= bound + 0.05
    sizes = [
        ramped[(e, 1)]["flow"].norm(dim=0).mean() / plain[(e, 1)]["flow"].norm(dim=0).mean() for e in (0, 1)
    ]
    assert 0.1 < sizes[0] < 0.4 and 0.35 < sizes[1] < 0.65  # a quarter, then half of the same draw
    for epoch in (3, 9):  # from epoch R - 1 on: the full deformation
        assert torch.equal(ramped[(epoch, 2)]["flow"], plain[(epoch, 2)]["flow"])
    val = data.MisalignedPairs(_pairset(size=64), params=params, seed=3, train=False, ramp_epochs=4)
    full = data.MisalignedPairs(_pairset(size=64), params=params, seed=3, train=False)
    assert torch.equal(val[(0, 2)]["flow"], full[(0, 2)]["flow"])
    with pytest.raises(ValueError, match=r"factor in \[0, 1\], got 1.5"):
        params.scaled_by(1.5)


def test_ground_truth_flow_realigns_the_moving_image() -> None:
    """Planted answer: warp(moving, flow) gives back the aligned label (away from the border)."""
    ds = data.MisalignedPairs(
        _pairset(size=64), params=DeformParams(rotate_deg=5, translate_px=3), seed=0, train=True
    )
    item = ds[(0, 0)]
    back = warp(item["moving"][None], item["flow"][None])[0]
    inner = (..., slice(12, -12), slice(12, -12))
    assert (back - item["label"])[inner].abs().mean() < 0.02
    assert (item["moving"] - item["label"])[inner].abs().mean() > 0.05  # it was misaligned


def test_augmentation_moves_both_images_alike() -> None:
    ds = data.MisalignedPairs(_pairset(), params=DeformParams.training(), seed=1, train=True)
    turned = 0
    for epoch in range(8):
        item = ds[(epoch, 0)]
        # fixed = flip_x(moving) * 0.5 before augmentation; flips and quarter turns preserve
        # "fixed is a mirror image of the label" up to the axis, so test the invariant directly.
        label, fixed = item["label"][0], item["fixed"][0]
        mirrored = [label.flip(-1) * 0.5, label.flip(-2) * 0.5]
        assert any(torch.allclose(fixed, m) for m in mirrored)
        turned += not torch.equal(label, ds.pairs.moving[0, 0])
    assert turned > 0


def test_epoch_batches_do_not_depend_on_worker_count() -> None:
    ds = data.MisalignedPairs(_pairset(6), params=DeformParams.training(), seed=2, train=True)

    def batches(workers: int) -> list[torch.Tensor]:
        sampler = data.EpochSampler(len(ds), seed=2)
        sampler.set_epoch(3)
        loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers)
        return [b["moving"] for b in loader]

    for x, y in zip(batches(0), batches(2), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_sampler_shares_global_batches_across_processes_and_skips() -> None:
    one = data.EpochSampler(8, seed=1)
    ranks = [data.EpochSampler(8, rank=r, world_size=2, seed=1) for r in range(2)]
    for s in (one, *ranks):
        s.set_epoch(4)
    order = [i for _, i in one]
    r0, r1 = ([i for _, i in s] for s in ranks)
    # Global batch 4 = two per process: the same four items per step in both set-ups.
    for step in range(2):
        assert sorted(order[4 * step : 4 * step + 4]) == sorted(
            r0[2 * step : 2 * step + 2] + r1[2 * step : 2 * step + 2]
        )
    one.set_epoch(4, skip=3)
    assert [i for _, i in one] == order[3:] and len(one) == 5
    assert {e for e, _ in one} == {4}


def test_pixel_amplitudes_scale_with_the_working_size() -> None:
    p = data.scaled_deform(
        DeformParams(translate_px=10, elastic_px=4, elastic_spacing_px=32, rotate_deg=7), 128
    )
    assert (p.translate_px, p.elastic_px, p.elastic_spacing_px, p.rotate_deg) == (5, 2, 16, 7)


def test_harvard_ct_mri_split_by_case(harvard_full: Path) -> None:
    moving_dir, fixed_dir = data.find_pair_folder(harvard_full / "CT-MRI")
    names = data.list_pairs(moving_dir, fixed_dir)
    assert moving_dir.name == "CT" and len(names) == 133
    train, val = data.split_by_case(names, val_cases=["16", "20"])
    assert {data.case_of(n) for n in val} == {"16", "20"}
    assert len(train) + len(val) == 133 and not set(train) & set(val)
