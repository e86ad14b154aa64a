"""The methods the protocol compares, each run on the same deformed pair (design.md §6).

Every method gives a fused image and, where it registers, the flow that registers the deformed
moving image onto the fixed one and the warped moving image. To compare *registrations* under one
fusion rule, the methods other than `bsafuse` align the pair first and then use the network's
fusion stage with its own registration switched off (:func:`identity_registration`: the
alignment module's flow is replaced by zeros, so MMFF fuses the pair as given):

- ``bsafuse``: the default pipeline on the deformed pair: SimpleITK rigid pre-alignment (skipped
  where the pair is nearly aligned: api.fuse's near_aligned_px and trained_motion_px), then
  the network registers what remains and fuses (api.fuse with its default ``prealign``).
- ``network``: the network alone on the deformed pair (``--prealign none``).
- ``rigid``: the rigid pre-alignment alone (applied even where the pipeline would leave it out),
  then the network's fusion of the pre-warped pair.
- ``none``: no registration: the network's fusion of the unaligned pair, flow 0.
- ``simpleitk``: SimpleITK (Mattes mutual information, affine then B-spline,
  ``prealign.register_classical(kind="bspline")``), then the network's fusion of the pre-warped
  pair; the flow is SimpleITK's.
- ``simpleitk+bsafuse``: the same pre-alignment, then the whole network on the pre-warped pair
  (pre-alignment as in design.md §5); the flow is the composition of both.
- ``oracle``: ground-truth alignment, then the network's fusion of (label, fixed); the flow is the
  ground-truth one. The ceiling of the protocol.
- ``average``: (label + fixed) / 2, the classic fusion floor; it does not register.
- ``max``: max(label, fixed) per pixel, the other classic rule (what L_inten asks of the network).

Where a flow samples outside the moving image there is no moving data and the fused image is the
fixed image there (design.md §1), as api.fuse does for the network's own flow.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bsafuse.errors import BsafuseError, InputError
from bsafuse.evaluation.cases import Case
from bsafuse.evaluation.catalogue import DEFAULT_METHODS, METHODS, NO_MODEL
from bsafuse.model.bsafusion import identity_registration
from bsafuse.warp import compose_flows, warp
from bsafuse.working_size import keep_fixed_outside

if TYPE_CHECKING:
    from bsafuse.device import Precision
    from bsafuse.model import BSAFusion


@dataclass(frozen=True)
class MethodResult:
    """One method's output for one pair: (H, W) float32 images, flow (2, H, W) or None, seconds."""

    fused: np.ndarray
    flow: np.ndarray | None  # registers the deformed moving image onto the fixed one
    warped: np.ndarray | None  # warp(moving, flow)
    seconds: float


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """Validated, de-duplicated method names in the given order; InputError names the choices."""
    names = tuple(dict.fromkeys(m.strip().lower() for m in methods if m.strip()))
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise InputError(
            f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}"
        )
    return names


def _warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    out = warp(
        torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None], torch.from_numpy(flow)[None]
    )
    return out[0, 0].numpy()


def _keep_fixed_outside(fused: np.ndarray, fixed: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Border rule (working_size.keep_fixed_outside) on numpy (H, W) images and a (2, H, W) flow."""

    def tensor(image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]

    out, _ = keep_fixed_outside(tensor(fused), tensor(fixed), torch.from_numpy(flow)[None])
    return out[0, 0].numpy()


class MethodRunner:
    """Runs methods on cases with one model; SimpleITK's flow is computed once per case."""

    def __init__(self, model: BSAFusion | None, *, precision: Precision = "fp32") -> None:
        self.model, self.precision = model, precision
        self._classical: tuple[str, np.ndarray] | None = None  # (case name, flow)

    def run(self, method: str, case: Case) -> MethodResult:
        start = time.perf_counter()
        fused, flow, warped = getattr(self, "_" + method.replace("+", "_"))(case)
        return MethodResult(
            np.clip(fused, 0, 1).astype(np.float32), flow, warped, time.perf_counter() - start
        )

    def _fuse(
        self,
        moving: np.ndarray,
        fixed: np.ndarray,
        *,
        register: bool,
        prealign: str | None = "none",
        always_prealign: bool = False,
    ) -> Any:
        from bsafuse.api import fuse

        if self.model is None:
            raise BsafuseError("this method needs the network; load a model (--weights)")
        options: dict[str, Any] = {"precision": self.precision, "prealign": prealign}
        if always_prealign:  # whatever the pipeline's nearly-aligned rules and guard would decide
            options.update(near_aligned_px=0.0, trained_motion_px=0.0, guard=False)
        if register:
            return fuse(moving, fixed, self.model, **options)
        with identity_registration(self.model):
            return fuse(moving, fixed, self.model, **options)

    def _classical_flow(self, case: Case) -> np.ndarray:
        if self._classical is None or self._classical[0] != case.name:
            from bsafuse.prealign import register_classical

            flow = register_classical(case.moving, case.fixed, kind="bspline", workers=torch.get_num_threads())
            self._classical = (case.name, flow)
        return self._classical[1]

    def _bsafuse(self, case: Case) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        result = self._fuse(case.moving, case.fixed, register=True, prealign=None)  # the weights' own
        return result.fused, result.flow, result.warped

    def _network(self, case: Case) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        result = self._fuse(case.moving, case.fixed, register=True)
        return result.fused, result.flow, result.warped

    def _rigid(self, case: Case) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        result = self._fuse(case.moving, case.fixed, register=False, prealign="rigid", always_prealign=True)
        return result.fused, result.flow, result.warped

    def _none(self, case: Case) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        result = self._fuse(case.moving, case.fixed, register=False)
        return result.fused, np.zeros((2, *case.fixed.shape), np.float32), case.moving

    def _simpleitk(self, case: Case) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        flow = self._classical_flow(case)
        warped = _warp(case.moving, flow)
        fused = self._fuse(warped, case.fixed, register=False).fused
        return _keep_fixed_outside(fused, case.fixed, flow), flow, warped

    def _simpleitk_bsafuse(self, case: Case) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        pre = self._classical_flow(case)
        result = self._fuse(_warp(case.moving, pre), case.fixed, register=True)
        total = compose_flows(torch.from_numpy(pre)[None], torch.from_numpy(result.flow)[None])[0].numpy()
        # api.fuse already kept the fixed image where the network's flow leaves the pre-warped image;
        # the total flow's rule adds the pre-alignment's border (a no-op where both are inside).
        return _keep_fixed_outside(result.fused, case.fixed, total), total, _warp(case.moving, total)

    def _oracle(self, case: Case) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        fused = self._fuse(case.label, case.fixed, register=False).fused
        if case.flow_true is None:  # pre-deformed set without flow/: the alignment is unknown
            return fused, None, None
        return fused, case.flow_true, _warp(case.moving, case.flow_true)

    def _average(self, case: Case) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        return (case.label + case.fixed) / 2, None, None

    def _max(self, case: Case) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        return np.maximum(case.label, case.fixed), None, None


def needs_model(methods: Sequence[str]) -> bool:
    return any(m not in NO_MODEL for m in methods)


__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "MethodResult",
    "MethodRunner",
    "check_methods",
    "identity_registration",
]
