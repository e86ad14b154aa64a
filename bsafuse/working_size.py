"""The one data path between images and the network (design.md §1): grey, working size, borders.

Training (`data.load_pairs`), validation, `fuse`/`register` (`api`) and `evaluate` all prepare a
pair here and bring the network's outputs back here, so the network sees in use exactly what it
saw in training (a test feeds one pair through both and compares).

- *Grey.* The network sees one channel: a grey image as it is, an RGB moving image (PET/SPECT
  pseudo-colour) as its BT.601 luma Y (`split_luma`); Cb and Cr stay outside the network.
- *Working size.* A (H, W) slice is zero-padded to a centred square of side max(H, W), never
  stretched (zeros are "no data", as outside any image), then resized to the working size S with
  bilinear interpolation on the align-corners grid (the corner pixels' centres coincide, the
  convention of `warp.resize_flow`), antialiased when shrinking. Outputs go back the same way
  and the padding is cropped; flow vectors are rescaled to output pixels.
- *Borders.* Where a flow samples outside the moving image there is no moving data; the fused
  image is the fixed image there, blended by the share of valid data (`keep_fixed_outside`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bsafuse.warp import resize_flow, warp


@dataclass(frozen=True)
class Placement:
    """Where a (height, width) slice sits in the network's size x size square."""

    height: int
    width: int
    size: int

    @property
    def side(self) -> int:
        return max(self.height, self.width)

    @property
    def padding(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) zeros that make the slice a centred square."""
        top, left = (self.side - self.height) // 2, (self.side - self.width) // 2
        return left, self.side - self.width - left, top, self.side - self.height - top

    def to_working(self, images: Tensor) -> Tensor:
        """(N, C, height, width) -> (N, C, size, size): pad to the square, then resize."""
        square = F.pad(images, self.padding)
        if self.side == self.size:
            return square
        return F.interpolate(
            square, size=(self.size, self.size), mode="bilinear", align_corners=True, antialias=self.side > self.size
        )

    def _crop(self, square: Tensor) -> Tensor:
        left, _, top, _ = self.padding
        return square[..., top : top + self.height, left : left + self.width].contiguous()

    def image_back(self, images: Tensor) -> Tensor:
        """(N, C, size, size) network output -> (N, C, height, width)."""
        if self.side != self.size:
            images = F.interpolate(images.float(), size=(self.side, self.side), mode="bilinear", align_corners=True)
        return self._crop(images)

    def flow_back(self, flow: Tensor) -> Tensor:
        """(N, 2, size, size) flow in working pixels -> (N, 2, height, width) in output pixels."""
        return self._crop(resize_flow(flow.float(), (self.side, self.side)))


def placement(height: int, width: int, size: int) -> Placement:
    """The Placement of a height x width slice for a network working at size x size."""
    return Placement(int(height), int(width), int(size))


def to_working(images: Tensor, size: int) -> Tensor:
    """(N, C, H, W) -> (N, C, size, size), as `Placement.to_working`."""
    height, width = images.shape[-2:]
    return placement(height, width, size).to_working(images)


def split_luma(pixels: np.ndarray, *, colour: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """What the network sees of a moving image: (grey, None), or (Y, YCbCr) when `colour`.

    `colour` says that the last axis holds R, G, B (an (H, W, 3) slice or an (N, H, W, 3) batch);
    the caller knows, since a (D, H, 3) grey volume has a last axis of 3 too.
    """
    from bsafuse.io.color import rgb_to_ycbcr

    if colour:
        ycc = np.asarray(rgb_to_ycbcr(pixels), dtype=np.float32)
        return np.ascontiguousarray(ycc[..., 0]), ycc
    return pixels, None


def keep_fixed_outside(fused: Tensor, fixed: Tensor, flow: Tensor) -> tuple[Tensor, Tensor]:
    """(fused with the fixed image where `flow` leaves the moving image, valid share (N, 1, H, W))."""
    valid = warp(torch.ones_like(fixed, dtype=torch.float32), flow)
    return valid * fused + (1 - valid) * fixed, valid


__all__ = ["Placement", "keep_fixed_outside", "placement", "split_luma", "to_working"]
