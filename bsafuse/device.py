"""Device choice: `auto` takes CUDA when torch can use it, else the CPU.

An explicit request that cannot be met is an error naming the alternatives; bsafuse never falls
back silently to another device.
"""

from __future__ import annotations

import contextlib

import torch

from bsafuse.choices import Precision
from bsafuse.errors import DeviceError

__all__ = ["Precision", "autocast_for", "pick_device"]


def pick_device(requested: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA if available else CPU; 'cpu', 'cuda' or 'cuda:N' are honoured or refused."""
    if isinstance(requested, torch.device):
        requested = str(requested)
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise DeviceError(
            f"--device {requested!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {requested!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {requested} asked for CUDA, but this torch build sees no GPU; "
                "use --device cpu (or auto)"
            )
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise DeviceError(f"--device {requested}: only {count} GPU(s) visible (cuda:0..cuda:{count - 1})")
    return device


def autocast_for(device: torch.device, precision: Precision = "fp32") -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on CUDA when asked for, a no-op context for fp32.

    bf16 on a CPU is refused rather than silently run in fp32.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise DeviceError(f"--precision bf16 runs on CUDA only, but the device is {device}; use --precision fp32")
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
