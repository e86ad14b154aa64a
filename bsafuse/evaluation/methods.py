"""The methods the protocol compares, each run on the same deformed pair (SPEC 6).

Every method gives a fused image and, where it registers, the flow that registers the deformed
moving image onto the fixed one and the warped moving image. To compare *registrations* under one
fusion rule, the methods other than `bsafuse` align the pair first and then use the network's
fusion stage with its own registration switched off (:func:`identity_registration`: the
alignment module's flow is replaced by zeros, so MMFF fuses the pair as given):

- ``bsafuse``: the network on the deformed pair (it registers and fuses).
- ``none``: no registration: the network's fusion of the unaligned pair, flow 0.
- ``simpleitk``: SimpleITK (Mattes mutual information, affine then B-spline,
  ``prealign.register_classical(kind="bspline")``), then the network's fusion of the pre-warped
  pair; the flow is SimpleITK's.
- ``simpleitk+bsafuse``: the same pre-alignment, then the whole network on the pre-warped pair
  (pre-alignment as in SPEC 5); the flow is the composition of both.
- ``oracle``: ground-truth alignment, then the network's fusion of (label, fixed); the flow is the
  ground-truth one. The ceiling of the protocol.
- ``average``: (label + fixed) / 2, the classic fusion floor; it does not register.

Where a flow samples outside the moving image there is no moving data and the fused image is the
fixed image there (SPEC 1), as api.fuse does for the network's own flow.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bsafuse.errors import BsafuseError, InputError
from bsafuse.evaluation.cases import Case
from bsafuse.warp import compose_flows, warp

if TYPE_CHECKING:
    from bsafuse.device import Precision
    from bsafuse.model import BSAFusion

METHODS: dict[str, str] = {
    "bsafuse": "the network registers and fuses the deformed pair",
    "none": "no registration (flow 0), the network's fusion of the unaligned pair",
    "simpleitk": "SimpleITK affine + B-spline (Mattes MI), then the network's fusion",
    "simpleitk+bsafuse": "SimpleITK affine + B-spline, then the whole network (flows composed)",
    "oracle": "ground-truth alignment, then the network's fusion",
    "average": "(label + fixed) / 2 on the aligned pair: the classic fusion floor",
}
DEFAULT_METHODS = ("bsafuse", "none", "simpleitk", "oracle", "average")
NO_MODEL = frozenset({"average"})  # methods that run without the network


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


@contextmanager
def identity_registration(model: BSAFusion) -> Iterator[None]:
    """Within the block, the model's registration outputs the zero flow (MMFF fuses as given)."""
    align = getattr(model, "align", None)
    if align is None or not isinstance(align, torch.nn.Module):
        raise TypeError(f"{type(model).__name__} has no `align` module; is it a BSAFusion model?")

    def zero_flow(module: torch.nn.Module, args: Any, output: Any) -> Any:
        return output._replace(flow=torch.zeros_like(output.flow))

    handle = align.register_forward_hook(zero_flow)
    try:
        yield
    finally:
        handle.remove()


def _warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    out = warp(
        torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None], torch.from_numpy(flow)[None]
    )
    return out[0, 0].numpy()


def _keep_fixed_outside(fused: np.ndarray, fixed: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Border rule: where `flow` samples outside the moving image, the fused image is the fixed one."""
    valid = _warp(np.ones_like(fixed), flow)
    return (valid * fused + (1 - valid) * fixed).astype(np.float32)


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

    def _fuse(self, moving: np.ndarray, fixed: np.ndarray, *, register: bool) -> Any:
        from bsafuse.api import fuse

        if self.model is None:
            raise BsafuseError("this method needs the network; load a model (--weights)")
        if register:
            return fuse(moving, fixed, self.model, precision=self.precision, prealign="none")
        with identity_registration(self.model):
            return fuse(moving, fixed, self.model, precision=self.precision, prealign="none")

    def _classical_flow(self, case: Case) -> np.ndarray:
        if self._classical is None or self._classical[0] != case.name:
            from bsafuse.prealign import register_classical

            self._classical = (case.name, register_classical(case.moving, case.fixed, kind="bspline"))
        return self._classical[1]

    def _bsafuse(self, case: Case) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        result = self._fuse(case.moving, case.fixed, register=True)
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
