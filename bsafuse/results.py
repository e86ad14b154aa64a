"""What a run returns: `FuseResult` for one pair of arrays, `FuseReport` for a run over files.

Plain data with no behaviour beyond summaries, so every layer (api, batch, report, cli) can
import it without importing the others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

Status = Literal["ok", "skipped", "failed"]


@dataclass(frozen=True)
class FuseResult:
    """One fused (or registered) pair, as float32 numpy arrays in the fixed image's pixel grid.

    `fused` and `warped` are (H, W) for a grey pair, (H, W, 3) RGB for a colour moving image,
    (D, H, W) for volumes. `flow` is the total displacement in pixels, (2, H, W) or (D, 2, H, W),
    channel 0 = x: warp(moving_resampled, flow) == warped. `valid` (same grid, no channels) is the
    share of real moving data behind each pixel. `moving_resampled` is the moving image in the fixed
    grid before registration and `fixed` the fixed pixels, both kept for reports and checks.
    """

    fused: np.ndarray
    warped: np.ndarray
    flow: np.ndarray
    valid: np.ndarray
    moving_resampled: np.ndarray
    fixed: np.ndarray
    prealign: str
    seconds: float
    # Slices where the network's flow made the pair less similar (normalised mutual information)
    # than the pre-alignment alone, and was dropped: the pre-alignment is kept there (design.md §5).
    fallback_slices: tuple[int, ...] = ()
    # Slices the pre-alignment was not applied to (nearly aligned: api.fuse's near_aligned_px and
    # trained_motion_px; or left less similar by it, or more similar by under MIN_PREALIGN_GAIN): the
    # network registered them alone (design.md §5).
    prealign_skipped: tuple[int, ...] = ()

    @property
    def is_volume(self) -> bool:
        return self.flow.ndim == 4

    @property
    def is_colour(self) -> bool:
        return self.fused.ndim == 3 and not self.is_volume


@dataclass
class PairOutcome:
    """What happened to one pair of a `fuse_files` run."""

    moving: Path | None
    fixed: Path | None
    output: Path
    status: Status
    error: str | None = None
    seconds: float = 0.0
    weights: str | None = None
    rank: int = 0  # the torchrun process that handled the pair (0 without torchrun)
    # Slices (0 for a 2-D pair) where the network's flow was dropped because it left the pair
    # less similar than the pre-alignment alone (FuseResult.fallback_slices).
    fallback_slices: list[int] = field(default_factory=list)
    # Slices registered by the network alone, the pre-alignment not applied to them
    # (FuseResult.prealign_skipped).
    prealign_skipped_slices: list[int] = field(default_factory=list)
    # The pre-alignment the pipeline ran: --prealign, else the weights' own (FuseResult.prealign).
    prealign: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (paths as strings): what --json prints and torchrun ranks exchange."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PairOutcome:
        paths = ("moving", "fixed", "output")
        fields: dict[str, Any] = {k: Path(v) if k in paths and v is not None else v for k, v in data.items()}
        return cls(**fields)


@dataclass
class FuseReport:
    """The outcome of a `fuse_files` run: one PairOutcome per pair.

    Under torchrun, rank 0's report holds every process's pairs (`processes` of them shared the
    run) and is the one to show; the other ranks' reports are empty and have `is_main` False.
    """

    mode: str
    device: str = ""
    folder: bool = False  # paired two folders (else one pair of files)
    items: list[PairOutcome] = field(default_factory=list)
    processes: int = 1
    is_main: bool = True

    @property
    def ok(self) -> list[PairOutcome]:
        return [i for i in self.items if i.status == "ok"]

    @property
    def failed(self) -> list[PairOutcome]:
        return [i for i in self.items if i.status == "failed"]

    @property
    def skipped(self) -> list[PairOutcome]:
        return [i for i in self.items if i.status == "skipped"]

    @property
    def weights(self) -> list[str]:
        """Every checkpoint used in this run (registry names or paths)."""
        return sorted({i.weights for i in self.items if i.weights})

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "device": self.device,
            "folder": self.folder,
            "processes": self.processes,
            "weights": self.weights,
            "ok": len(self.ok),
            "skipped": len(self.skipped),
            "failed": len(self.failed),
            "pairs": [i.to_dict() for i in self.items],
        }
