"""Normalisation of source values to [0, 1], and back: the one place where it happens.

Every reader maps the file's real values (Hounsfield units for CT, counts, MR signal, PNG grey
levels) linearly onto [0, 1] with an `IntensityMap`: `low` goes to 0, `high` to 1, and values
outside are clipped. The map travels with the image, so a writer can turn pixels back into source
values (`IntensityMap.restore`). How the map is chosen (`choose_map`):

- An explicit window (`read_image(..., window=(center, width))`, the CLI's `--window`) wins.
- CT (DICOM Modality "CT"): the default window `BRAIN_BONE_WINDOW`, centre 100 HU, width 400 HU,
  i.e. -100 HU -> 0 and 300 HU -> 1. The released weights were trained on the Harvard atlas CT
  slices, where brain parenchyma sits near grey level 0.35, CSF a little darker, air and fat black
  and bone saturated white; this window puts brain (about 35 HU) at 0.34, CSF (about 5 HU) at
  0.26 and saturates bone from 300 HU up, so a CT in HU looks like the training data. A pure brain
  window (40/80) would saturate most of the head and a bone window (400/1800) flattens the brain.
- Other modalities (MR, PT, NM, NIfTI without a window, ...): robust percentiles
  `PERCENTILES` = (0.5, 99.5) of the finite values. `low` and `high` are taken as actual data
  values (numpy's "lower" / "higher" methods), so reading a file that was written back from such
  an image finds the same percentiles again and round trips are stable.
- PNG and colour data: by bit depth, 8-bit / 255 and 16-bit / 65535 (`bit_depth_map`).

A constant image (high == low) maps to 0 everywhere; `restore` gives back the constant.
A map with high < low is an inverted one (DICOM MONOCHROME1): bright pixels are low values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bsafuse.errors import InputError

BRAIN_BONE_WINDOW = (100.0, 400.0)  # default CT window: (centre, width) in HU
PERCENTILES = (0.5, 99.5)  # percent: robust range for modalities without a standard window


@dataclass(frozen=True)
class IntensityMap:
    """Linear map of source values onto [0, 1]: `low` -> 0, `high` -> 1, clipped outside.

    `method` records how it was chosen: "window", "percentile", "bit-depth" or "unit" (values were
    already in [0, 1]).
    """

    low: float
    high: float
    method: str = "unit"

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high)):
            raise InputError(f"intensity range must be finite, got low={self.low}, high={self.high}")

    @property
    def window(self) -> tuple[float, float]:
        """The same map as a DICOM-style (centre, width) window; width is positive."""
        return (self.low + self.high) / 2, abs(self.high - self.low)

    def normalise(self, values: ArrayLike) -> NDArray[np.float32]:
        """Source values -> float32 pixels in [0, 1]."""
        values = np.asarray(values, dtype=np.float64)
        if self.high == self.low:
            return np.zeros(values.shape, dtype=np.float32)
        scaled = (values - self.low) / (self.high - self.low)
        return np.clip(scaled, 0.0, 1.0).astype(np.float32)

    def restore(self, pixels: ArrayLike) -> NDArray[np.float64]:
        """Pixels in [0, 1] -> source values (float64); the inverse of `normalise` inside the range."""
        return self.low + np.asarray(pixels, dtype=np.float64) * (self.high - self.low)


def window_map(center: float, width: float) -> IntensityMap:
    """A (centre, width) window, as DICOM and radiologists state it."""
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise InputError(f"window must be (centre, width) with a positive width, got ({center}, {width})")
    return IntensityMap(center - width / 2, center + width / 2, "window")


def percentile_map(values: ArrayLike, percentiles: tuple[float, float] = PERCENTILES) -> IntensityMap:
    """Robust range of `values`: the given percentiles, taken as actual data values."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return IntensityMap(0.0, 1.0, "percentile")
    low = float(np.percentile(flat, percentiles[0], method="lower"))
    high = float(np.percentile(flat, percentiles[1], method="higher"))
    return IntensityMap(low, high, "percentile")


def bit_depth_map(bits: int) -> IntensityMap:
    """Full range of an unsigned integer of `bits` bits: 8 -> /255, 16 -> /65535."""
    return IntensityMap(0.0, float(2**bits - 1), "bit-depth")


def choose_map(
    values: ArrayLike, *, modality: str | None, window: tuple[float, float] | None = None
) -> IntensityMap:
    """The map for grey source values: explicit window, else CT window, else percentiles."""
    if window is not None:
        return window_map(*window)
    if modality == "CT":
        return window_map(*BRAIN_BONE_WINDOW)
    return percentile_map(values)
