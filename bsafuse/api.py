"""The library entry points: load a model, then fuse (or register) image pairs.

```python
from bsafuse import load_model, fuse
from bsafuse.io import read_image, write_image
moving, fixed = read_image("ct.png"), read_image("mri.png")
model = load_model("path/to/best.pt")            # or a registry name, or "auto" with moving=
result = fuse(moving, fixed, model)              # FuseResult: numpy arrays in fixed's grid
write_image("fused.png", result.fused, like=fixed)
```

Files and folders (reading, pairing, writing outputs, torchrun) are `bsafuse.batch.fuse_files`,
one layer up; this module works on arrays and MedicalImages only.

How a pair is handled (design.md §1 and §5):

- *Grids.* Everything happens in the fixed image's pixel grid. A moving image of another size is
  brought there first: a volume (or a 2-D image with real geometry) is resampled in world
  coordinates with SimpleITK (`bsafuse.io.resample.resample_to`); a plain 2-D array or PNG, which
  carries no geometry, is assumed to cover the same field of view and is resized.
- *Working size.* The network runs at `config.image_size`. Each slice is padded to a square (never
  stretched), resized to that size, and the fused image and flow are resized back; flow vectors are
  rescaled to output pixels. The warped image is resampled from the full-resolution moving image
  with the full-resolution flow, so it stays sharp.
- *Colour.* An RGB moving image goes through the network as its BT.601 luma Y; Cb and Cr are warped
  with the same flow (neutral grey where the moving image has no data) and recombined with the
  fused Y.
- *Borders.* Where the total flow samples outside the moving image there is no moving data, and the
  fused image is the fixed image there (blended by the share of valid moving data).
- *Pre-alignment.* `prealign="rigid"|"affine"` first registers the moving slice to the fixed one with
  SimpleITK, for 2-D pairs and volume slices alike (default: the one the weights were calibrated
  with, their checkpoint's "prealign" entry, `model.prealign`, else rigid: the v2 networks are
  trained on what rigid leaves; pet-mri-v2 carries affine); the reported flow is the total
  (pre-alignment composed with the network's flow). An affine pre-alignment is the rigid result
  refined, and the rules below judge it by its rigid step (`registration_steps.prealign_flows`).
- *Nearly aligned pairs.* Where the pre-alignment moves a slice by less than NEAR_ALIGNED_PX on
  average (scaled from 256 px to the slice's size), it is not applied and the network registers
  the slice alone (`FuseResult.prealign_skipped`): that motion is inside what the network was
  trained on, while the mutual-information optimum of a PET or SPECT slice against its MRI lies a
  few pixels from the anatomical alignment (design.md §5). So is a move under TRAINED_MOTION_PX
  where the network alone, run on the unregistered pair, finds under STILL_PX of motion (or the
  value the checkpoint was calibrated with: its "still_px" entry, `model.still_px`).
- *Guard.* No registration step may leave a slice less similar to the fixed one than it was
  (normalised mutual information, which works across modalities). A pre-alignment that does, or
  that raises it by less than MIN_PREALIGN_GAIN (no evidence in the images for the move), is not
  applied (`FuseResult.prealign_skipped`); where the network's flow does, the network's
  registration is dropped for that slice: the pre-alignment is kept and the network fuses the
  pre-aligned pair (`FuseResult.fallback_slices`, a logged warning).

The library never prints; progress goes to an optional callback, messages to `logging`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from bsafuse._pair import ImageLike, pair_in_fixed_grid
from bsafuse.choices import (
    MIN_PREALIGN_GAIN,
    NEAR_ALIGNED_PX,
    PREALIGN_KINDS,
    TRAINED_MOTION_PX,
    Prealign,
    Precision,
)
from bsafuse.errors import InputError
from bsafuse.io import MedicalImage
from bsafuse.loading import load_model
from bsafuse.registration_steps import (
    Alone,
    as_numpy,
    less_similar,
    nearly_aligned,
    network_pass,
    network_reusing,
    prealign_flows,
    prealign_of,
    still_px_of,
)
from bsafuse.results import FuseResult
from bsafuse.warp import compose_flows, warp
from bsafuse.working_size import keep_fixed_outside, split_luma

if TYPE_CHECKING:
    from torch import Tensor

    from bsafuse.model import BSAFusion

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # (done, total, what) after each step


# ------------------------------------------------------------------------------------- fuse one


def fuse(
    moving: ImageLike,
    fixed: ImageLike,
    model: BSAFusion,
    *,
    precision: Precision = "fp32",
    prealign: Prealign | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
    guard: bool = True,
    ignore_geometry: bool = False,
    near_aligned_px: float = NEAR_ALIGNED_PX,
    trained_motion_px: float = TRAINED_MOTION_PX,
    still_px: float | None = None,
) -> FuseResult:
    """Register `moving` onto `fixed` and fuse them with `model`, in the fixed image's grid.

    Inputs are MedicalImages (from `bsafuse.io.read_image`) or float arrays in [0, 1] (uint8 and
    uint16 are scaled): moving (H, W), (H, W, 3) RGB or (D, H, W); fixed (H, W) or (D, H, W) grey.
    `prealign` is "none", "rigid" or "affine"; None means the weights' own (`model.prealign`), else
    DEFAULT_PREALIGN (rigid). With `guard`,
    a slice whose pair the network's flow leaves less similar (normalised mutual information)
    than the pre-alignment alone keeps the pre-alignment (`FuseResult.fallback_slices`, and a
    logged warning). A slice that the pre-alignment would move less than `near_aligned_px` (at
    256 px; 0 turns this off) is registered by the network alone (`FuseResult.prealign_skipped`),
    and so is one it would move less than `trained_motion_px` where the network alone finds under
    `still_px` of motion in the unregistered pair (0 turns this off; None: the value the weights
    were calibrated with, `model.still_px`, else STILL_PX); with `guard`, so is one the
    pre-alignment would leave less similar than it was, or more similar by under MIN_PREALIGN_GAIN.
    `ignore_geometry` centres the moving image on the fixed one instead of placing
    both by their headers (pairs without a shared frame of reference). Volume slices go through the
    network `batch_size` at a time. See the module docstring.
    """
    start = time.perf_counter()
    kind = prealign or prealign_of(model)
    if kind not in PREALIGN_KINDS:
        raise InputError(f"prealign must be one of {', '.join(PREALIGN_KINDS)}, got {kind!r}")
    moving_px, fixed_px, is_volume = pair_in_fixed_grid(
        moving, fixed, ignore_geometry=ignore_geometry, centre_if_apart=kind != "none"
    )
    colour = moving_px.ndim == 3 and moving_px.shape[-1] == 3 and not is_volume
    fixed_s = fixed_px if is_volume else fixed_px[None]  # (D, H, W)
    moving_s = moving_px if is_volume else moving_px[None]  # (D, H, W) or (1, H, W, 3)
    outputs = []
    total = len(fixed_s)
    for lo in range(0, total, max(1, batch_size)):
        sl = slice(lo, min(lo + max(1, batch_size), total))
        outputs.append(
            _fuse_slices(
                moving_s[sl],
                fixed_s[sl],
                model,
                colour=colour,
                prealign=kind,
                precision=precision,
                guard=guard,
                near_aligned_px=near_aligned_px,
                trained_motion_px=trained_motion_px,
                still_px=still_px_of(model) if still_px is None else still_px,
            )
        )
        if progress is not None:
            progress(sl.stop, total, "slices")
    fused, warped, flow, valid, dropped, skipped = (
        np.concatenate(parts) for parts in zip(*outputs, strict=True)
    )
    fallback = tuple(int(i) for i in np.flatnonzero(dropped))
    prealign_skipped = tuple(int(i) for i in np.flatnonzero(skipped))
    if prealign_skipped:
        log.info(
            "%s pre-alignment not applied to %d of %d slices: nearly aligned, or not clearly more similar after it",
            kind,
            len(prealign_skipped),
            total,
        )
    if fallback:
        where = "" if not is_volume else f" in {len(fallback)} of {total} slices"
        pair = f"{fixed.name}: " if isinstance(fixed, MedicalImage) and fixed.path is not None else ""
        unregistered = kind == "none" or set(fallback) <= set(prealign_skipped)
        log.warning(
            "%sthe network's registration made the pair less similar than %s%s; kept %s",
            pair,
            "no registration" if unregistered else f"{kind} pre-alignment alone",
            where,
            "the unregistered pair" if unregistered else f"the {kind} pre-alignment",
        )
    if not is_volume:
        fused, warped, flow, valid = fused[0], warped[0], flow[0], valid[0]
    return FuseResult(
        fused=fused,
        warped=warped,
        flow=flow,
        valid=valid,
        moving_resampled=moving_px,
        fixed=fixed_px,
        prealign=kind,
        seconds=time.perf_counter() - start,
        fallback_slices=fallback,
        prealign_skipped=prealign_skipped,
    )


def _fuse_slices(
    moving: np.ndarray,
    fixed: np.ndarray,
    model: BSAFusion,
    *,
    colour: bool,
    prealign: str,
    precision: Precision,
    guard: bool,
    near_aligned_px: float,
    trained_motion_px: float,
    still_px: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One batch of same-sized slices -> fused, warped, flow (N, 2, H, W), valid, dropped, skipped (N,)."""
    from bsafuse.io.color import ycbcr_to_rgb
    from bsafuse.model import identity_registration

    grey, ycc = split_luma(moving, colour=colour)  # ycc: (N, H, W, 3) Y, Cb, Cr
    device = next(model.parameters()).device
    mov = torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float32))[:, None].to(device)  # (N, 1, H, W)
    fix = torch.from_numpy(np.ascontiguousarray(fixed, dtype=np.float32))[:, None].to(device)  # (N, 1, H, W)
    prealigned = prealign_flows(grey, fixed, prealign)
    skipped = torch.zeros(len(mov), dtype=torch.bool)
    alone: Alone | None = None
    mov_in = mov  # what the network registers: the pre-aligned slice where pre-alignment is applied
    pre: Tensor | None = None  # (N, 2, H, W): the pre-alignment applied
    if prealigned is not None:
        judged, applied = prealigned
        skipped, alone = nearly_aligned(
            judged, mov, fix, model, precision, near_aligned_px, trained_motion_px, still_px
        )
        moved = warp(mov, judged.to(device))
        if guard:  # the pre-alignment must leave a pair clearly more similar than it was (design.md §5)
            skipped |= less_similar(mov, moved, fix, margin=MIN_PREALIGN_GAIN).cpu()
        if applied is not judged:  # an affine refinement
            moved = warp(mov, applied.to(device))
        pre = applied.masked_fill(skipped[:, None, None, None], 0.0)
        mov_in = torch.where(skipped.to(device)[:, None, None, None], mov, moved)
    base = pre.to(device) if pre is not None else torch.zeros_like(fix).expand(-1, 2, -1, -1)
    fused_t, net_flow = network_reusing(model, mov_in, fix, precision, alone, skipped)
    flow = compose_flows(base, net_flow) if pre is not None else net_flow  # total, pixels
    # The network must never leave a pair less similar than the pre-alignment did (design.md §5).
    dropped = less_similar(mov_in, warp(mov, flow), fix) if guard else torch.zeros(len(mov), dtype=torch.bool)
    if dropped.any():
        with identity_registration(model):
            fused_base, _ = network_pass(model, mov_in[dropped], fix[dropped], precision)
        fused_t, flow = fused_t.clone(), flow.clone()
        fused_t[dropped], flow[dropped] = fused_base, base[dropped]
    fused_t, valid = keep_fixed_outside(fused_t, fix, flow)
    if ycc is not None:
        rgb = torch.from_numpy(np.ascontiguousarray(moving, dtype=np.float32)).permute(0, 3, 1, 2).to(device)
        chroma = torch.from_numpy(np.ascontiguousarray(ycc[..., 1:], dtype=np.float32)).permute(0, 3, 1, 2)
        chroma = warp(chroma.to(device) - 0.5, flow) + 0.5  # neutral grey where there is no moving data
        warped = as_numpy(warp(rgb, flow)).transpose(0, 2, 3, 1)
        fused = ycbcr_to_rgb(np.concatenate([as_numpy(fused_t), as_numpy(chroma)], axis=1).transpose(0, 2, 3, 1))
    else:
        warped = as_numpy(warp(mov, flow))[:, 0]
        fused = as_numpy(fused_t)[:, 0]
    return (
        np.clip(fused, 0, 1).astype(np.float32),
        np.clip(warped, 0, 1).astype(np.float32),
        as_numpy(flow),
        as_numpy(valid)[:, 0],
        as_numpy(dropped),
        as_numpy(skipped),
    )


__all__: Sequence[str] = ["FuseResult", "fuse", "load_model"]
