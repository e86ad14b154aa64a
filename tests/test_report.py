"""report.py: the --report figure, written atomically; a clear message without matplotlib."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bsafuse.api import FuseResult
from bsafuse.errors import BsafuseError
from bsafuse.report import checkerboard, write_report


def result(*, colour: bool = False, volume: bool = False) -> FuseResult:
    ys, xs = np.mgrid[0:48, 0:64] / 64.0
    grey = (0.5 + 0.5 * np.sin(6 * xs) * np.cos(5 * ys)).astype(np.float32)
    flow = np.stack([np.full_like(grey, 2.5), np.zeros_like(grey)])
    moving = np.stack([grey, grey[::-1], grey], axis=-1) if colour else grey
    if volume:
        grey, moving, flow = np.stack([grey] * 3), np.stack([moving] * 3), np.stack([flow] * 3)
    return FuseResult(
        fused=moving, warped=moving, flow=flow, valid=np.ones(grey.shape, np.float32),
        moving_resampled=moving, fixed=grey, prealign="none", seconds=0.1,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["grey", "colour", "volume"])
def test_report_is_a_png(tmp_path: Path, kind: str) -> None:
    path = write_report(tmp_path / "r" / "report.png", result(colour=kind == "colour", volume=kind == "volume"),
                        title="pair 1")  # fmt: skip
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (1300, 700)
    assert [p.name for p in path.parent.iterdir()] == ["report.png"]  # no temporary file left


def test_checkerboard_alternates_tiles() -> None:
    a, b = np.zeros((16, 16)), np.ones((16, 16))
    board = checkerboard(a, b, tiles=4)
    assert board[0, 0] == 0 and board[0, 4] == 1 and board[4, 4] == 0 and board.mean() == 0.5


def test_missing_matplotlib_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(BsafuseError, match=r'pip install "bsafuse\[plots\]"'):
        write_report(tmp_path / "r.png", result())
    assert not (tmp_path / "r.png").exists()
