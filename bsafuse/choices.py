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
# px at REFERENCE_SIZE: a pre-alignment move under TRAINED_MOTION_PX is motion the v2 networks were
# trained to correct (the `residual` deformation moves a pixel 3.8-7.5 px on average, 10th-90th
# percentile); there, where the network alone finds under STILL_PX of motion in the unregistered
# pair, the pre-alignment is not applied either. Chosen on deformed pairs, 2026-12-07 (design.md §5).
TRAINED_MOTION_PX = 8.0
STILL_PX = 2.0
# Normalised mutual information: a pre-alignment that raises the pair's NMI by less than this is not
# applied (the guard): the images give no evidence for that move, however large (a flat optimum,
# e.g. a top-of-head slice). Chosen on deformed pairs, 2026-12-07 (design.md §5).
MIN_PREALIGN_GAIN = 0.002
