"""The names of the protocol's methods and what each does (plain data: no torch, for --help)."""

from __future__ import annotations

from bsafuse.choices import NEAR_ALIGNED_PX, STILL_PX, TRAINED_MOTION_PX

METHODS: dict[str, str] = {
    "bsafuse": "the default pipeline (fuse): the weights' own pre-alignment (rigid; pet-mri-v2: rigid "
    "refined as an affine, judged by its rigid step) unless it would move the pair under "
    f"{NEAR_ALIGNED_PX:g} px (or under {TRAINED_MOTION_PX:g} px where the network alone finds under "
    f"{STILL_PX:g} px, or the weights' own calibration), or the images give no evidence for the move "
    "(guard), then the network registers and fuses",
    "network": "the network alone (--prealign none) registers and fuses the deformed pair",
    "rigid": "SimpleITK rigid pre-alignment alone, then the network's fusion",
    "none": "no registration (flow 0), the network's fusion of the unaligned pair",
    "simpleitk": "SimpleITK affine + B-spline (Mattes MI), then the network's fusion",
    "simpleitk+bsafuse": "SimpleITK affine + B-spline, then the whole network (flows composed)",
    "oracle": "ground-truth alignment, then the network's fusion",
    "average": "(label + fixed) / 2 on the aligned pair: the classic fusion floor",
    "max": "max(label, fixed) per pixel on the aligned pair: the other classic rule",
}
DEFAULT_METHODS = ("bsafuse", "none", "simpleitk", "oracle", "average", "max")
NO_MODEL = frozenset({"average", "max"})  # methods that run without the network
