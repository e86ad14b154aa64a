"""bsafuse: register and fuse unaligned MRI-CT/PET/SPECT pairs with BSAFusion (AAAI 2025).

The public API is imported lazily, so `import bsafuse` (and the command line's --help) does
not load torch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bsafuse._lazy import lazy_attributes
from bsafuse._version import __version__

# The library logs (warnings such as the registration guard's) and never prints: without a
# handler of the application's, nothing reaches stderr (logging's last-resort handler stays out).
logging.getLogger("bsafuse").addHandler(logging.NullHandler())

__all__ = ["BSAFusion", "FuseResult", "__version__", "fuse", "fuse_files", "load_model"]

if TYPE_CHECKING:
    from bsafuse.api import fuse
    from bsafuse.batch import fuse_files
    from bsafuse.loading import load_model
    from bsafuse.model import BSAFusion
    from bsafuse.results import FuseResult

_HOMES = {
    "BSAFusion": "bsafuse.model",
    "FuseResult": "bsafuse.results",
    "fuse": "bsafuse.api",
    "fuse_files": "bsafuse.batch",
    "load_model": "bsafuse.loading",
}


__getattr__ = lazy_attributes(__name__, _HOMES)
