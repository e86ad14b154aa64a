"""The `--report` figure: one PNG per pair that shows what registration and fusion did.

Panels: moving (in the fixed grid, before registration), fixed, warped moving, checkerboards of
moving/fixed before and after registration, the fused image, and the deformation grid. For a
volume the middle slice is shown. matplotlib is an optional extra (``pip install "bsafuse[plots]"``),
imported only here; the figure is written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bsafuse.errors import BsafuseError
from bsafuse.io.atomic import atomic_path

if TYPE_CHECKING:
    from bsafuse.results import FuseResult

CHECKER_TILES = 8  # squares along the longer side of a checkerboard
GRID_LINES = 16  # lines along the longer side of the deformation grid


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = CHECKER_TILES) -> np.ndarray:
    """Alternate square tiles of `a` and `b` (same shape, grey or RGB): edges show misalignment."""
    h, w = a.shape[:2]
    size = max(1, max(h, w) // tiles)
    ys, xs = np.indices((h, w))
    mask = ((ys // size + xs // size) % 2).astype(bool)
    if a.ndim == 3:
        mask = mask[..., None]
    return np.where(mask, b, a)


def _grey_like(image: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Give a grey image three channels when `like` has them, so the two can be tiled."""
    return np.repeat(image[..., None], 3, axis=-1) if like.ndim == 3 and image.ndim == 2 else image


def _middle(result: FuseResult) -> dict[str, np.ndarray]:
    """The 2-D arrays the panels show (the middle slice of a volume)."""
    k = len(result.fixed) // 2 if result.is_volume else None
    pick = (lambda a: a[k]) if k is not None else (lambda a: a)
    return {
        "moving": pick(result.moving_resampled),
        "fixed": pick(result.fixed),
        "warped": pick(result.warped),
        "fused": pick(result.fused),
        "flow": pick(result.flow),
    }


def _draw_grid(ax: Any, flow: np.ndarray) -> None:
    """Lines of a regular grid, moved by the flow (where each output pixel samples the moving image)."""
    _, h, w = flow.shape
    step = max(1, max(h, w) // GRID_LINES)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    px, py = xs + flow[0], ys + flow[1]
    for r in range(0, h, step):
        ax.plot(px[r], py[r], color="tab:blue", linewidth=0.6)
    for c in range(0, w, step):
        ax.plot(px[:, c], py[:, c], color="tab:blue", linewidth=0.6)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_aspect("equal")
    magnitude = np.hypot(flow[0], flow[1])
    ax.set_title(f"deformation (max {magnitude.max():.1f} px)", fontsize=9)


def write_report(path: str | os.PathLike[str], result: FuseResult, *, title: str | None = None) -> Path:
    """Write the report figure of one pair to `path` (PNG) atomically and return the path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BsafuseError('--report needs matplotlib: pip install "bsafuse[plots]"') from None
    path = Path(path)
    views = _middle(result)
    moving, fixed, warped = views["moving"], views["fixed"], views["warped"]
    panels = [
        ("moving", moving),
        ("fixed", fixed),
        ("warped moving", warped),
        ("checkerboard before", checkerboard(_grey_like(fixed, moving), moving)),
        ("checkerboard after", checkerboard(_grey_like(fixed, warped), warped)),
        ("fused", views["fused"]),
    ]
    fig = Figure(figsize=(13, 7), dpi=100, layout="constrained")  # no pyplot: no global state
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 4)
    for ax, (name, image) in zip(axes.flat, panels, strict=False):
        ax.imshow(np.clip(image, 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
    _draw_grid(axes.flat[6], views["flow"])
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    info = axes.flat[7]
    info.axis("off")
    lines = [
        f"pre-alignment: {result.prealign}",
        f"size: {' x '.join(str(n) for n in result.fixed.shape)}",
        f"moving data behind {100 * float(np.mean(result.valid)):.0f}% of pixels",
        f"time: {result.seconds:.2f} s",
    ]
    info.text(0.0, 0.9, "\n".join(lines), va="top", fontsize=9, family="monospace", transform=info.transAxes)
    if title:
        fig.suptitle(title, fontsize=11)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
