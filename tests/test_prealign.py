"""prealign.py: SimpleITK registration recovers planted misalignments, in bsafuse's flow convention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

import bsafuse.prealign as prealign
from bsafuse.deform import DeformParams, random_deformation
from bsafuse.errors import InputError
from bsafuse.prealign import register_classical
from bsafuse.warp import warp

RIGID = DeformParams(rotate_deg=8, translate_px=8, scale=0, elastic_px=0)


def load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    a, b = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def plant(
    image: np.ndarray, params: DeformParams, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(deformed image, true flow (2, H, W), mask of pixels the deformed image covers)."""
    deformed, flow_true = random_deformation(
        torch.from_numpy(image)[None, None], params=params, generator=torch.Generator().manual_seed(seed)
    )
    covered = warp(torch.ones_like(deformed), flow_true)[0, 0].numpy() > 0.999
    return deformed[0, 0].numpy(), flow_true[0].numpy(), covered


def apply(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    return warp(torch.from_numpy(image)[None, None], torch.from_numpy(flow)[None])[0, 0].numpy()


@pytest.fixture(scope="module")
def mri(harvard: Path) -> np.ndarray:
    return load(harvard / "CT-MRI" / "MRI" / "16003.png")


@pytest.mark.parametrize("kind", ["rigid", "affine"])
def test_planted_rigid_motion_is_recovered(mri: np.ndarray, kind: str) -> None:
    deformed, flow_true, covered = plant(mri, RIGID)
    head = (mri > 0.05) & covered
    assert np.linalg.norm(flow_true, axis=0)[head].max() > 8  # a real misalignment
    assert ncc(mri, deformed, head) < 0.5

    flow = register_classical(deformed, mri, kind=kind)  # type: ignore[arg-type]
    assert flow.shape == (2, *mri.shape) and flow.dtype == np.float32
    assert ncc(mri, apply(deformed, flow), head) > 0.98
    error = np.linalg.norm(flow - flow_true, axis=0)[head]
    assert error.max() < 0.5  # pixels, everywhere in the head


@pytest.mark.slow
def test_bspline_recovers_an_elastic_warp_better_than_affine(mri: np.ndarray) -> None:
    deformed, flow_true, covered = plant(
        mri, DeformParams(rotate_deg=5, translate_px=5, elastic_px=4), seed=1
    )
    head = (mri > 0.05) & covered
    affine = np.linalg.norm(register_classical(deformed, mri, kind="affine") - flow_true, axis=0)[head]
    bspline_flow = register_classical(deformed, mri, kind="bspline")
    bspline = np.linalg.norm(bspline_flow - flow_true, axis=0)[head]
    assert bspline.mean() < 0.6 * affine.mean()
    assert bspline.mean() < 0.6
    assert ncc(mri, apply(deformed, bspline_flow), head) > 0.98


def test_ct_is_registered_onto_its_mri(harvard: Path) -> None:
    """Across modalities (mutual information): a planted rigid motion of a CT, onto the MRI."""
    ct, mri = (load(harvard / "CT-MRI" / sub / "34015.png") for sub in ("CT", "MRI"))
    deformed, flow_true, covered = plant(
        ct, DeformParams(rotate_deg=6, translate_px=8, scale=0, elastic_px=0)
    )
    head = (mri > 0.05) & covered
    before = np.linalg.norm(flow_true, axis=0)[head].mean()
    after = np.linalg.norm(register_classical(deformed, mri, kind="rigid") - flow_true, axis=0)[head].mean()
    assert before > 6 and after < 1.5


@pytest.mark.parametrize("degrees", [18.0, -18.0])
def test_ct_turned_18_degrees_is_registered_onto_its_mri(harvard: Path, degrees: float) -> None:
    """Large turns across modalities: starts at 0, +-8 degrees alone ended 7.8 / 8.1 px off here."""
    ct, mri = (load(harvard / "CT-MRI" / sub / "34015.png") for sub in ("CT", "MRI"))
    image = sitk.GetImageFromArray(ct)
    turn = sitk.Euler2DTransform((127.5, 127.5), np.radians(degrees), (6.0, -4.0))
    deformed = sitk.GetArrayFromImage(sitk.Resample(image, image, turn, sitk.sitkLinear, 0.0))
    # deformed(p) = ct(turn(p)), so the flow that brings it back onto the CT's grid is turn^-1(p) - p.
    field = sitk.TransformToDisplacementField(
        turn.GetInverse(), sitk.sitkVectorFloat64, image.GetSize(), image.GetOrigin(), image.GetSpacing()
    )
    flow_true = np.moveaxis(sitk.GetArrayFromImage(field), -1, 0)
    head = mri > 0.05
    before = np.linalg.norm(flow_true, axis=0)[head].mean()
    after = np.linalg.norm(register_classical(deformed, mri, kind="rigid") - flow_true, axis=0)[head].mean()
    assert before > 20 and after < 1.5


def test_same_inputs_same_flow_and_identity_stays(mri: np.ndarray) -> None:
    deformed, _, _ = plant(mri, RIGID, seed=3)
    first = register_classical(deformed, mri, kind="rigid")
    assert np.array_equal(first, register_classical(deformed, mri, kind="rigid"))
    # the rigid starts optimised three at a time in threads: the same flow, bit for bit
    assert np.array_equal(first, register_classical(deformed, mri, kind="rigid", workers=3))
    still = register_classical(mri, mri, kind="affine")
    assert np.abs(still).max() < 0.1


def test_the_stages_of_one_registration_are_the_kinds_before_it(mri: np.ndarray) -> None:
    # the pipeline judges an affine pre-alignment by its rigid step: both come from one registration
    deformed, _, _ = plant(mri, DeformParams(rotate_deg=6, translate_px=6, scale=0.05, elastic_px=0), seed=1)
    rigid, affine = prealign.register_stages(deformed, mri, kind="affine")
    assert np.array_equal(rigid, register_classical(deformed, mri, kind="rigid"))
    assert np.array_equal(affine, register_classical(deformed, mri, kind="affine"))
    assert np.abs(affine - rigid).mean() > 0.5  # the scale is the affine step's to find
    assert len(prealign.register_stages(deformed, mri, kind="rigid")) == 1


def test_bspline_across_modalities_is_reproducible(harvard: Path) -> None:
    """ITK's threaded sums vary in order; the chaotic B-spline stage must still repeat exactly."""
    ct, mri = (
        np.asarray(Image.open(harvard / "CT-MRI" / sub / "34015.png").resize((128, 128)), np.float32) / 255
        for sub in ("CT", "MRI")
    )
    deformed, _, _ = plant(ct, DeformParams(translate_px=5, elastic_px=2), seed=2)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    first = register_classical(deformed, mri, kind="bspline")
    assert np.array_equal(first, register_classical(deformed, mri, kind="bspline"))
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads  # restored


def test_small_images_use_fewer_pyramid_levels() -> None:
    ys, xs = np.mgrid[0:24, 0:24].astype(np.float32)
    fixed = np.exp(-((xs - 11) ** 2 + (ys - 12) ** 2) / 30).astype(np.float32)
    moving = np.exp(-((xs - 13) ** 2 + (ys - 11) ** 2) / 30).astype(np.float32)  # shifted by (+2, -1)
    flow = register_classical(moving, fixed, kind="rigid")
    assert np.allclose(flow[:, 12, 11], [2, -1], atol=0.3)


@pytest.mark.parametrize(
    ("moving", "fixed", "kwargs", "message"),
    [
        (np.zeros((32, 32)), np.zeros((32, 40)), {}, r"moving image is constant"),
        (np.random.default_rng(0).random((32, 32)), np.random.default_rng(1).random((32, 40)), {},
         r"moving image is \(32, 32\) but fixed image is \(32, 40\); resample"),
        (np.ones((2, 32, 32)), np.ones((32, 32)), {}, r"moving image must be a 2-D grey image \(H, W\), got shape \(2, 32, 32\)"),
        (np.full((32, 32), np.nan), np.ones((32, 32)), {}, r"moving image must hold finite numbers"),
        (np.ones((8, 8)), np.ones((8, 8)), {}, r"moving image is 8x8; classical registration needs >= 16x16"),
        (np.ones((32, 32)), np.ones((32, 32)), {"kind": "demons"}, r"kind must be one of rigid, affine, bspline, got 'demons'"),
        (np.ones((32, 32)), np.ones((32, 32)), {"sampling": 0.0}, r"sampling must be in \(0, 1\], got 0.0"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_input_error(
    moving: np.ndarray, fixed: np.ndarray, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        register_classical(moving, fixed, **kwargs)  # type: ignore[arg-type]


def test_itk_failures_become_one_clear_input_error(monkeypatch: pytest.MonkeyPatch, mri: np.ndarray) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError(
            "Exception thrown in SimpleITK ImageRegistrationMethod_Execute:\n"
            "itkMattesMutualInformationImageToImageMetricv4.hxx:308:\n"
            "ITK ERROR: All samples map outside moving image buffer."
        )

    monkeypatch.setattr(prealign, "_rigid", fail)
    with pytest.raises(
        InputError, match=r"^affine registration with SimpleITK failed: ITK ERROR: All samples map"
    ):
        register_classical(mri, mri)
