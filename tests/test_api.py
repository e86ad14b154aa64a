"""api.py on arrays: sizes, colour, borders, volumes, pre-alignment, errors, silence."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

from bsafuse.api import FuseResult, fuse, load_model
from bsafuse.choices import MIN_PREALIGN_GAIN
from bsafuse.config import ModelConfig
from bsafuse.errors import InputError, WeightsError
from bsafuse.io.color import rgb_to_ycbcr
from bsafuse.loading import Provenance
from bsafuse.metrics import normalised_mutual_information as nmi
from bsafuse.registration_steps import Prealigned
from bsafuse.warp import warp


def phantom(height: int = 64, width: int = 64, *, shift: float = 0.0) -> np.ndarray:
    """A smooth head-like test image in [0, 1]: an ellipse with an inner blob, shifted in x."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = height / 2, width / 2 + shift
    outer = ((xs - cx) / (0.35 * width)) ** 2 + ((ys - cy) / (0.4 * height)) ** 2
    inner = ((xs - cx - 0.08 * width) / (0.1 * width)) ** 2 + (
        (ys - cy + 0.1 * height) / (0.12 * height)
    ) ** 2
    image = 0.6 / (1 + np.exp(np.minimum(8 * (outer - 1), 50))) + 0.4 / (
        1 + np.exp(np.minimum(6 * (inner - 1), 50))
    )
    return image.astype(np.float32)


class _Flow(NamedTuple):
    flow: torch.Tensor


class PlantedAlign(nn.Module):
    """The registration half of PlantedModel: a constant flow (what identity_registration zeroes)."""

    def __init__(self, shift: tuple[float, float]) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, moving: torch.Tensor) -> _Flow:
        flow = torch.zeros(moving.shape[0], 2, *moving.shape[-2:])
        flow[:, 0], flow[:, 1] = self.shift
        return _Flow(flow)


class PlantedModel(nn.Module):
    """Stands in for BSAFusion: a planted constant flow; fusion = the brighter of warped and fixed."""

    def __init__(self, shift: tuple[float, float], image_size: int = 64) -> None:
        super().__init__()
        self.config = dataclasses.replace(ModelConfig.small(), image_size=image_size)
        self.align = PlantedAlign(shift)
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.inputs: list[tuple[int, ...]] = []

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, *, transfer_scores: bool = True) -> SimpleNamespace:
        assert not transfer_scores  # inference asks for the fused image and the flow only
        self.inputs.append(tuple(moving.shape))
        flow = self.align(moving).flow
        warped = warp(moving, flow)
        return SimpleNamespace(fused=torch.maximum(warped, fixed), flow=flow, warped=warped)


def test_guard_keeps_the_pre_alignment_where_the_network_makes_things_worse() -> None:
    aligned = phantom()
    wrong = PlantedModel(shift=(6.0, 0.0))  # moves an aligned pair 6 px apart
    result = fuse(aligned, aligned, wrong, prealign="none")
    assert result.fallback_slices == (0,)
    assert float(np.abs(result.flow).max()) == 0.0  # the unregistered (aligned) pair is kept
    np.testing.assert_allclose(result.fused, aligned, atol=0.02)  # max(A, A) = A, no shifted copy
    assert len(wrong.inputs) == 2  # once with its flow, once fusing with the flow switched off
    unguarded = fuse(aligned, aligned, PlantedModel(shift=(6.0, 0.0)), prealign="none", guard=False)
    assert unguarded.fallback_slices == () and float(unguarded.flow[0].mean()) == pytest.approx(6.0, rel=1e-4)


def test_guard_keeps_a_network_flow_that_helps() -> None:
    right = PlantedModel(shift=(4.0, 0.0))  # the moving image is 4 px to the right: +4 samples it back
    result = fuse(phantom(shift=4), phantom(), right, prealign="none")
    assert result.fallback_slices == ()
    assert float(result.flow[0].mean()) == pytest.approx(4.0, rel=1e-4)


def test_a_pre_alignment_that_hardly_moves_the_pair_is_not_applied() -> None:
    # 128 px: NEAR_ALIGNED_PX (5 px at 256) is 2.5 px here. A still network shows what was kept.
    near = fuse(phantom(128, 128, shift=1.5), phantom(128, 128), PlantedModel((0.0, 0.0), 128), guard=False)
    assert near.prealign_skipped == (0,) and float(np.abs(near.flow).max()) == 0.0
    applied = fuse(
        phantom(128, 128, shift=1.5), phantom(128, 128), PlantedModel((0.0, 0.0), 128), guard=False, near_aligned_px=0,
        trained_motion_px=0,
    )
    assert applied.prealign_skipped == () and float(applied.flow[0].mean()) == pytest.approx(1.5, abs=0.3)
    far = fuse(phantom(128, 128, shift=8), phantom(128, 128), PlantedModel((0.0, 0.0), 128), guard=False)
    assert far.prealign_skipped == () and float(far.flow[0].mean()) == pytest.approx(8.0, abs=0.5)


def test_inside_the_trained_motion_the_network_alone_decides_whether_to_pre_align() -> None:
    # 128 px: NEAR_ALIGNED_PX 2.5 px, TRAINED_MOTION_PX 4 px, STILL_PX 1 px; a 3 px shift is between.
    moving, fixed = phantom(128, 128, shift=3), phantom(128, 128)
    still = PlantedModel((0.0, 0.0), 128)  # the network alone finds no motion: rigid is not applied
    kept = fuse(moving, fixed, still, guard=False)
    assert kept.prealign_skipped == (0,) and float(np.abs(kept.flow).max()) == 0.0
    assert len(still.inputs) == 1  # its answer alone is the registration and fusion: not run again
    seeing = PlantedModel((3.0, 0.0), 128)  # it finds 3 px: rigid is applied, the network adds its 3 px
    applied = fuse(moving, fixed, seeing, guard=False)
    assert applied.prealign_skipped == () and float(applied.flow[0].mean()) == pytest.approx(6.0, abs=0.5)
    assert len(seeing.inputs) == 2  # asked alone, then run again on the pre-aligned pair
    unasked = PlantedModel((0.0, 0.0), 128)
    off = fuse(moving, fixed, unasked, guard=False, trained_motion_px=0)
    assert off.prealign_skipped == () and float(off.flow[0].mean()) == pytest.approx(3.0, abs=0.3)
    assert len(unasked.inputs) == 1


def test_the_still_threshold_is_the_one_the_weights_were_calibrated_with() -> None:
    # 128 px, a 3 px shift (inside the trained motion); the network alone finds 0.8 px: under the
    # default STILL_PX (2 px at 256, 1 px here), over a calibration of 1 px at 256 (0.5 px here).
    moving, fixed = phantom(128, 128, shift=3), phantom(128, 128)
    default = fuse(moving, fixed, PlantedModel((0.8, 0.0), 128), guard=False)
    assert default.prealign_skipped == (0,) and float(default.flow[0].mean()) == pytest.approx(0.8, rel=1e-4)
    calibrated = PlantedModel((0.8, 0.0), 128)
    calibrated.still_px = 1.0
    applied = fuse(moving, fixed, calibrated, guard=False)
    assert applied.prealign_skipped == () and float(applied.flow[0].mean()) == pytest.approx(3.8, abs=0.3)
    asked = fuse(moving, fixed, calibrated, guard=False, still_px=2.0)  # the caller's value wins
    assert asked.prealign_skipped == (0,)


def test_the_weights_choose_the_pre_alignment_and_an_affine_one_is_judged_by_its_rigid_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []

    def planted(rigid_px: float, affine_px: float) -> Callable[..., Prealigned]:
        """Stands in for SimpleITK: its rigid step moves rigid_px along x, the affine one affine_px."""

        def flows(moving: np.ndarray, fixed: np.ndarray, kind: str) -> Prealigned:
            asked.append(kind)
            judged, applied = torch.zeros(2, 1, 2, 128, 128)
            judged[:, 0], applied[:, 0] = rigid_px, rigid_px if kind == "rigid" else affine_px
            return Prealigned(judged, applied)

        return flows

    moving, fixed = phantom(128, 128, shift=8.5), phantom(128, 128)
    model = PlantedModel((0.0, 0.0), 128)
    model.prealign = "affine"  # what a checkpoint's "prealign" entry sets
    monkeypatch.setattr("bsafuse.api.prealign_flows", planted(8.0, 8.5))
    refined = fuse(moving, fixed, model, guard=False)
    assert asked == ["affine"] and refined.prealign == "affine"
    assert float(refined.flow[0].mean()) == pytest.approx(8.5)  # the affine refinement is applied
    asked_for = fuse(moving, fixed, model, prealign="rigid", guard=False)  # the caller's choice wins
    assert asked[-1] == "rigid" and float(asked_for.flow[0].mean()) == pytest.approx(8.0)
    # an affine fit that moves a nearly aligned pair far (scale and shear chasing intensities): its
    # rigid step, 1 px (under NEAR_ALIGNED_PX), decides, and nothing is applied
    monkeypatch.setattr("bsafuse.api.prealign_flows", planted(1.0, 9.0))
    near = fuse(fixed, fixed, model, guard=False)
    assert near.prealign_skipped == (0,) and float(np.abs(near.flow).max()) == 0.0


def test_a_volume_mixes_slices_the_network_registers_alone_and_pre_aligned_ones() -> None:
    # slice 0 is 3 px off (inside the trained motion, and the network sees none), slice 1 is 8 px off
    moving = np.stack([phantom(128, 128, shift=3), phantom(128, 128, shift=8)])
    fixed = np.stack([phantom(128, 128)] * 2)
    still = PlantedModel((0.0, 0.0), 128)
    result = fuse(moving, fixed, still, guard=False)
    assert result.prealign_skipped == (0,)
    assert float(np.abs(result.flow[0]).max()) == 0.0
    assert float(result.flow[1, 0].mean()) == pytest.approx(8.0, abs=0.5)
    assert still.inputs == [(1, 1, 128, 128), (1, 1, 128, 128)]  # slice 0 alone, then slice 1 only


def test_guard_declines_a_pre_alignment_that_leaves_the_pair_less_similar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # an aligned pair and a pre-alignment gone wrong (12 px off, far beyond the nearly-aligned rules)
    wrong = torch.zeros(1, 2, 128, 128)
    wrong[:, 0] = 12.0
    monkeypatch.setattr("bsafuse.api.prealign_flows", lambda *args: Prealigned(wrong.clone(), wrong.clone()))
    aligned = phantom(128, 128)
    declined = fuse(aligned, aligned, PlantedModel((0.0, 0.0), 128))
    assert declined.prealign_skipped == (0,) and float(np.abs(declined.flow).max()) == 0.0
    unguarded = fuse(aligned, aligned, PlantedModel((0.0, 0.0), 128), guard=False)
    assert unguarded.prealign_skipped == () and float(unguarded.flow[0].mean()) == pytest.approx(12.0)


def test_guard_declines_a_pre_alignment_the_images_give_no_evidence_for(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 12 px move of a slice 6.02 px off: it lands 5.98 px off on the other side, a hair more
    # similar (NMI +0.001): a flat optimum, like a top-of-head PET slice's, not evidence of motion.
    move = torch.zeros(1, 2, 128, 128)
    move[:, 0] = 12.0
    monkeypatch.setattr("bsafuse.api.prealign_flows", lambda *args: Prealigned(move.clone(), move.clone()))
    fixed, barely = phantom(128, 128), phantom(128, 128, shift=6.02)
    before = torch.from_numpy(barely)[None, None]
    gain = nmi(warp(before, move)[0, 0].numpy(), fixed) - nmi(barely, fixed)
    assert 0 < gain < MIN_PREALIGN_GAIN  # the planted case: more similar, by less than the margin
    declined = fuse(barely, fixed, PlantedModel((0.0, 0.0), 128))
    assert declined.prealign_skipped == (0,) and float(np.abs(declined.flow).max()) == 0.0
    # the same move where the slice is 12 px off: clearly more similar, applied
    recovered = fuse(phantom(128, 128, shift=12.0), fixed, PlantedModel((0.0, 0.0), 128))
    assert recovered.prealign_skipped == () and float(recovered.flow[0].mean()) == pytest.approx(12.0)


def test_grey_pair_shapes_and_ranges(tiny_model: nn.Module) -> None:
    moving, fixed = phantom(shift=3), phantom()
    result = fuse(moving, fixed, tiny_model)
    assert isinstance(result, FuseResult) and not result.is_volume and not result.is_colour
    assert result.fused.shape == result.warped.shape == result.valid.shape == (64, 64)
    assert result.flow.shape == (2, 64, 64) and result.flow.dtype == np.float32
    assert 0 <= result.fused.min() and result.fused.max() <= 1
    assert result.prealign == "rigid"  # the default pipeline
    again = fuse(moving, fixed, tiny_model)
    np.testing.assert_array_equal(result.fused, again.fused)  # deterministic


def test_working_size_round_trip_rescales_flow_to_output_pixels() -> None:
    model = PlantedModel(shift=(2.0, -1.0), image_size=64)
    result = fuse(phantom(128, 128), phantom(128, 128), model, prealign="none", guard=False)
    assert model.inputs == [(1, 1, 64, 64)]
    np.testing.assert_allclose(result.flow[0], 2.0 * 127 / 63, rtol=1e-5)
    np.testing.assert_allclose(result.flow[1], -1.0 * 127 / 63, rtol=1e-5)


def test_non_square_is_padded_not_stretched() -> None:
    model = PlantedModel(shift=(0.0, 0.0), image_size=64)
    fixed = phantom(40, 64)
    result = fuse(fixed, fixed, model)
    assert result.fused.shape == (40, 64) and result.flow.shape == (2, 40, 64)
    # zero flow and max-fusion of an image with itself: the image comes back (up to resampling)
    np.testing.assert_allclose(result.fused, fixed, atol=0.02)


def test_moving_of_another_size_is_resized_to_the_fixed_grid() -> None:
    result = fuse(phantom(32, 32), phantom(64, 64), PlantedModel(shift=(0.0, 0.0)), prealign="none")
    assert result.moving_resampled.shape == (64, 64) and result.fused.shape == (64, 64)


def test_moving_of_another_aspect_keeps_its_aspect_centred(caplog: pytest.LogCaptureFixture) -> None:
    wide = np.ones((20, 40), np.float32)  # 1:2 onto a square grid: scaled by 1.6 to 32 x 64, centred
    with caplog.at_level("WARNING", logger="bsafuse"):
        result = fuse(wide, phantom(64, 64), PlantedModel(shift=(0.0, 0.0)), prealign="none", guard=False)
    band = result.moving_resampled
    assert band.shape == (64, 64)
    assert float(band[16:48].min()) == pytest.approx(1.0) and float(band[:15].max()) == 0.0 and float(band[49:].max()) == 0.0
    assert "is 20 x 40 pixels and the fixed image 64 x 64" in caplog.text and "not stretched" in caplog.text
    with caplog.at_level("WARNING", logger="bsafuse"):
        caplog.clear()
        fuse(np.ones((32, 32), np.float32), phantom(64, 64), PlantedModel(shift=(0.0, 0.0)), prealign="none")
    assert "not stretched" not in caplog.text  # same aspect: a plain resize, nothing to say


def test_border_rule_with_planted_shift() -> None:
    """Where the flow samples outside the moving image, the fused image is the fixed image."""
    shift = 20.0
    fixed = np.full((64, 64), 0.2, np.float32)
    moving = np.ones((64, 64), np.float32)  # bright everywhere: any leak shows
    result = fuse(moving, fixed, PlantedModel(shift=(shift, 0.0)))
    outside = result.valid < 1e-3
    assert outside[:, -15:].all() and not outside[:, :30].any()
    np.testing.assert_allclose(result.fused[:, -15:], fixed[:, -15:], atol=1e-5)
    assert result.fused[:, :30].min() > 0.9  # inside, the moving data is there


def test_border_rule_with_prealignment_and_the_tiny_network(tiny_model: nn.Module) -> None:
    fixed = phantom(64, 64)
    moving = np.zeros_like(fixed)
    moving[:, :-12] = fixed[:, 12:]  # the anatomy moved 12 px left; no data in the right strip
    result = fuse(moving, fixed, tiny_model, prealign="rigid")
    assert result.prealign == "rigid"
    assert np.median(result.flow[0]) == pytest.approx(-12, abs=1.5)  # total flow: pre-alignment included
    left = result.valid[:, :8] < 1e-3
    assert left.all()
    np.testing.assert_allclose(result.fused[:, :8], fixed[:, :8], atol=1e-4)


def test_grey_rgb_moving_gives_rgb_output_with_neutral_chroma(tiny_model: nn.Module) -> None:
    grey = phantom(shift=2)
    result = fuse(np.repeat(grey[..., None], 3, axis=-1), phantom(), tiny_model)
    assert result.is_colour and result.fused.shape == (64, 64, 3) and result.warped.shape == (64, 64, 3)
    np.testing.assert_allclose(result.fused[..., 0], result.fused[..., 1], atol=1e-5)
    np.testing.assert_allclose(result.fused[..., 1], result.fused[..., 2], atol=1e-5)


def test_colour_chroma_is_warped_not_fused() -> None:
    """Cb/Cr of the fused image are the moving image's, moved by the flow (here: zero flow)."""
    ys, xs = np.mgrid[0:64, 0:64] / 63.0
    rgb = np.stack([0.3 + 0.4 * xs, 0.5 * np.ones_like(xs), 0.3 + 0.4 * ys], axis=-1).astype(np.float32)
    fixed = np.full((64, 64), 0.5, np.float32)
    result = fuse(rgb, fixed, PlantedModel(shift=(0.0, 0.0)))
    fused_ycc, moving_ycc = rgb_to_ycbcr(result.fused), rgb_to_ycbcr(rgb)
    np.testing.assert_allclose(fused_ycc[..., 1:], moving_ycc[..., 1:], atol=2e-3)
    # and Y is the fused luma: max(moving Y, fixed) for the planted max-fusion
    np.testing.assert_allclose(fused_ycc[..., 0], np.maximum(moving_ycc[..., 0], 0.5), atol=0.02)


def test_volume_arrays_are_fused_slice_by_slice_in_batches(tiny_model: nn.Module) -> None:
    volume = np.stack([phantom(32, 48, shift=s) for s in (0, 1, 2)])
    calls: list[tuple[int, int, str]] = []
    model = PlantedModel(shift=(0.0, 0.0))
    result = fuse(volume, volume, model, batch_size=2, progress=lambda *a: calls.append(a))
    assert result.is_volume and result.prealign == "rigid"  # the volume default
    assert result.fused.shape == (3, 32, 48) and result.flow.shape == (3, 2, 32, 48)
    assert [c[:2] for c in calls] == [(2, 3), (3, 3)]
    assert [s[0] for s in model.inputs] == [2, 1]


def test_pair_errors_name_the_problem() -> None:
    model = PlantedModel(shift=(0.0, 0.0))
    with pytest.raises(InputError, match=r"volume but the fixed image is 2-D"):
        fuse(np.zeros((3, 32, 32), np.float32), phantom(32, 32), model)
    with pytest.raises(InputError, match=r"colour \(RGB\).*the fixed image must be the grey MRI"):
        colour = np.stack([phantom(), np.zeros((64, 64), np.float32), phantom()], axis=-1)
        fuse(phantom(), colour, model)
    with pytest.raises(InputError, match=r"moving array has values in \[.*, 2\]; expected \[0, 1\]"):
        fuse(phantom() * 2, phantom(), model)
    with pytest.raises(InputError, match=r"NaN"):
        fuse(np.full((64, 64), np.nan, np.float32), phantom(), model)
    with pytest.raises(InputError, match=r"prealign must be one of"):
        fuse(phantom(), phantom(), model, prealign="bspline")  # type: ignore[arg-type]


def test_uint8_arrays_are_scaled() -> None:
    fixed = (phantom() * 255).astype(np.uint8)
    result = fuse(fixed, fixed, PlantedModel(shift=(0.0, 0.0)))
    np.testing.assert_allclose(result.fixed, fixed / 255.0, atol=1e-6)


def test_library_never_prints(
    tiny_model: nn.Module, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    # as a fresh process has it: no handler the CLI of an earlier in-process test installed
    logger = logging.getLogger("bsafuse")
    monkeypatch.setattr(logger, "handlers", [h for h in logger.handlers if isinstance(h, logging.NullHandler)])
    fuse(phantom(shift=5), phantom(), tiny_model)  # the random flow trips the guard: a warning is logged
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_load_model(tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint, device="cpu")
    assert not model.training and next(model.parameters()).device.type == "cpu"
    assert torch.is_inference_mode_enabled() is False
    digest = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert model.provenance == Provenance(None, tiny_checkpoint, digest)  # a file of one's own: no name
    assert model.provenance.label == str(tiny_checkpoint)


def test_load_model_records_the_shipped_name_auto_chose() -> None:
    from bsafuse import weights

    colour = np.stack([phantom()] * 3, axis=-1)
    model = load_model("auto", device="cpu", moving=colour)  # colour without a DICOM Modality: PET
    provenance = model.provenance
    assert provenance is not None and provenance.name == weights.canonical("pet-mri") == "pet-mri-v2"
    assert provenance.path is not None and provenance.sha256 == weights.REGISTRY["pet-mri-v2"].sha256
    assert load_model("auto", device="cpu", modality="NM").provenance.name == "spect-mri-v2"  # type: ignore[union-attr]


def test_auto_weights_without_a_release_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    from bsafuse import weights

    monkeypatch.setattr(weights, "REGISTRY", {})
    colour = np.stack([phantom()] * 3, axis=-1)
    with pytest.raises(WeightsError, match=r"--weights auto chose 'pet-mri'.*--weights path/to/best\.pt"):
        load_model("auto", device="cpu", moving=colour)
