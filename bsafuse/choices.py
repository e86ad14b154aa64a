"""The vocabularies of bsafuse's options, one `Literal` each; the CLI's choices derive from them.

Kept free of torch and SimpleITK, so the command line's --help stays instant.
"""

from __future__ import annotations

from typing import Literal, get_args

Prealign = Literal["none", "rigid", "affine"]  # classical pre-registration before the network
Precision = Literal["fp32", "bf16"]  # bf16: autocast, CUDA only
Mode = Literal["fuse", "register"]  # what `fuse_files` writes as its main output

PREALIGN_KINDS: tuple[str, ...] = get_args(Prealign)
PRECISIONS: tuple[str, ...] = get_args(Precision)
DEFAULT_PREALIGN: Prealign = "rigid"  # the v2 networks are trained on what rigid pre-alignment leaves

REFERENCE_SIZE = 256  # px: the image size that pixel amplitudes and thresholds are given for
# px at REFERENCE_SIZE (scaled to the slice's larger side): a pre-alignment that would move a slice
# less than this on average is not applied; the network registers it alone. Chosen on 12 deformed
# training pairs per type (design.md §5).
NEAR_ALIGNED_PX = 5.0
