"""`bsafuse evaluate`: score fused images, and run the paper's protocol on a data folder (design.md §6, §7).

Two entry points:

- :func:`score_files` (image mode): the five fusion metrics of a fused image F against the moving
  image A and the fixed MRI B. Per design.md §6, A should be the *ground-truth-aligned* moving image (the
  label), as in the paper's tables.
- :func:`run_protocol` (protocol mode): deform every aligned pair of a data folder with a seed of its
  own (or read a folder of pre-deformed pairs with labels), run each method, and score it. The
  report is written by :func:`write_outputs` (results.csv, summary.json, box plots).

Scoring convention (the paper's; design.md §6, tests/data/metrics-reference): fusion metrics compare
F with (label, fixed) on 8-bit grey images (0..255; a colour image is reduced to its BT.601 luma Y),
exactly as the saved PNGs would be scored; registration metrics compare the method's flow with the
ground-truth flow and its warped moving image with the label. ``scoring.py`` holds that
convention, ``cases.py`` the data, ``methods.py`` the methods, ``protocol.py`` the run and
``report.py`` the files.

The library never prints; progress goes to a callback ``(done, total, what)``.
"""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use, so image mode (`score_files`) runs without importing torch.
_HOMES = {
    "DEFAULT_METHODS": "catalogue",
    "METHODS": "catalogue",
    "ProtocolReport": "protocol",
    "run_protocol": "protocol",
    "summarise": "report",
    "write_outputs": "report",
    "ROW_METRICS": "scoring",
    "score_files": "scoring",
}

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "ROW_METRICS",
    "ProtocolReport",
    "run_protocol",
    "score_files",
    "summarise",
    "write_outputs",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"bsafuse.evaluation.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'bsafuse.evaluation' has no attribute {name!r}")
