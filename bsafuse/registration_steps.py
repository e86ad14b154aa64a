"""The registration steps of `api.fuse` and their judges (design.md §5).

The classical pre-alignment of each slice (`prealign_flows`), the rules that leave it out for a
nearly aligned slice (`nearly_aligned`), the network's pass at its working size (`network_pass`,
`network_reusing`), and the one similarity judge of both steps (`less_similar`: normalised mutual
information, which works across modalities). Shapes are (N, C, H, W) batches of slices.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

from bsafuse.choices import DEFAULT_PREALIGN, REFERENCE_SIZE, STILL_PX, Precision
from bsafuse.device import autocast_for
from bsafuse.errors import InputError
from bsafuse.working_size import placement

if TYPE_CHECKING:
    from bsafuse.model import BSAFusion

log = logging.getLogger(__name__)


class Alone(NamedTuple):
    """The network's outputs on the unregistered slices `asked` (N,) bool: fused (N, 1, H, W) and
    flow (N, 2, H, W), zeros on the other slices."""

    asked: Tensor
    fused: Tensor
    flow: Tensor


def still_px_of(model: object) -> float:
    """The STILL_PX these weights were calibrated with (their checkpoint's "still_px"), else STILL_PX."""
    value = getattr(model, "still_px", None)
    return STILL_PX if value is None else float(value)


def prealign_of(model: object) -> str:
    """The pre-alignment these weights were calibrated with (their checkpoint's "prealign"), else
    DEFAULT_PREALIGN."""
    value = getattr(model, "prealign", None)
    return DEFAULT_PREALIGN if value is None else str(value)


def nearly_aligned(
    pre: Tensor, moving: Tensor, fixed: Tensor, model: BSAFusion, precision: Precision,
    near_px: float, trained_px: float, still_px: float,
) -> tuple[Tensor, Alone | None]:  # fmt: skip
    """(N,) bool: slices the pre-alignment flow `pre` should not be applied to (design.md §5).

    Those it would move by under `near_px` on average, and those it would move by under
    `trained_px` (motion the network was trained to correct) where the network alone, run on the
    unregistered pair, finds under `still_px` (`still_px_of(model)`): there a functional slice's
    mutual-information optimum is more often off than the pair is misaligned. Thresholds are px
    at REFERENCE_SIZE.
    Also returns what the network gave on the slices it was asked about (None if none), for
    `network_reusing`.
    """
    per_px = max(fixed.shape[-2:]) / REFERENCE_SIZE
    moved = pre.norm(dim=1).mean(dim=(1, 2))
    skipped = moved < near_px * per_px
    ask = ~skipped & (moved < trained_px * per_px)
    if not ask.any():
        return skipped, None
    where = ask.to(moving.device)
    fused, flow = network_pass(model, moving[where], fixed[where], precision)
    skipped[ask] = flow.norm(dim=1).mean(dim=(1, 2)).cpu() < still_px * per_px
    alone = Alone(ask, fused.new_zeros((len(moving), *fused.shape[1:])), flow.new_zeros(pre.shape))
    alone.fused[where], alone.flow[where] = fused, flow
    return skipped, alone


def network_reusing(
    model: BSAFusion, moving: Tensor, fixed: Tensor, precision: Precision, alone: Alone | None, unmoved: Tensor
) -> tuple[Tensor, Tensor]:
    """`network_pass` on every slice, except where `alone` holds its outputs for a slice that stayed
    `unmoved` (no pre-alignment applied: the same input); those are taken as they are."""
    if alone is None or not (known := alone.asked & unmoved).any():
        return network_pass(model, moving, fixed, precision)
    fused, flow = alone.fused, alone.flow
    rest = (~known).to(moving.device)
    if rest.any():
        fused[rest], flow[rest] = network_pass(model, moving[rest], fixed[rest], precision)
    return fused, flow


def less_similar(before: Tensor, after: Tensor, fixed: Tensor, *, margin: float = 0.0) -> Tensor:
    """(N,) bool: slices whose moving image `after` a registration step is less similar to the fixed
    one than `before` it (normalised mutual information, which works across modalities), or more
    similar by less than `margin`."""
    from bsafuse.metrics import normalised_mutual_information as nmi

    pairs = zip(as_numpy(after)[:, 0], as_numpy(before)[:, 0], as_numpy(fixed)[:, 0], strict=True)
    return torch.tensor(
        [nmi(a, f) < nmi(b, f) + margin for a, b, f in pairs], dtype=torch.bool, device=before.device
    )


def network_pass(
    model: BSAFusion, moving: Tensor, fixed: Tensor, precision: Precision
) -> tuple[Tensor, Tensor]:
    """Run the model at its working size (bsafuse.working_size) and map its outputs back.

    Shapes: (N, 1, H, W) each -> fused (N, 1, H, W), flow (N, 2, H, W) in output pixels.
    """
    height, width = moving.shape[-2:]
    place = placement(height, width, model.config.image_size)
    with torch.inference_mode(), autocast_for(moving.device, precision):
        out = model(place.to_working(moving), place.to_working(fixed), transfer_scores=False)
    return place.image_back(out.fused.float()).clamp(0, 1), place.flow_back(out.flow)


class Prealigned(NamedTuple):
    """The classical pre-alignment of a batch of slices, (N, 2, H, W) flows in pixels: `judged`, the
    rigid step, which the nearly-aligned rules and the similarity guard decide on, and `applied`,
    what a slice they accept is warped by (the same tensor for a rigid pre-alignment, or its affine
    refinement)."""

    judged: Tensor
    applied: Tensor


def prealign_flows(moving: np.ndarray, fixed: np.ndarray, kind: str) -> Prealigned | None:
    """Classical (SimpleITK) registration of each moving slice to its fixed slice, or None.

    An affine pre-alignment is judged by its rigid step: an affine fit moves a nearly aligned
    functional slice further than a rigid one (scale and shear follow intensity differences), so
    the rules decide on the rigid step and the affine refinement goes where they accept it
    (design.md §5).
    """
    if kind == "none":
        return None
    from bsafuse.prealign import register_stages

    stages: list[tuple[np.ndarray, ...]] = []
    for k, (m, f) in enumerate(zip(moving, fixed, strict=True)):
        still = np.zeros((2, *f.shape), np.float32)
        if float(m.std()) < 1e-6 or float(f.std()) < 1e-6:  # an empty slice has nothing to align
            stages.append((still, still))
            continue
        try:
            flows = register_stages(m, f, kind=kind, workers=torch.get_num_threads())  # type: ignore[arg-type]
        except InputError as exc:
            if len(moving) == 1:
                raise
            # One slice of a volume (often a nearly empty end slice) need not stop the others.
            log.warning("slice %d: %s pre-alignment skipped (%s)", k, kind, exc)
            flows = (still,)
        stages.append((flows[0], flows[-1]))
    judged = torch.from_numpy(np.stack([rigid for rigid, _ in stages]))
    if kind == "rigid":
        return Prealigned(judged, judged)  # one tensor: the slices are warped once
    return Prealigned(judged, torch.from_numpy(np.stack([last for _, last in stages])))


def as_numpy(x: Tensor) -> np.ndarray:
    """A tensor's values as a float32 NumPy array on the CPU."""
    return x.detach().float().cpu().numpy()
