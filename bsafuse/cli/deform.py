"""`bsafuse deform` (being written)."""

from __future__ import annotations

from bsafuse.cli._common import fail

SHORT = "(not available yet)"
HELP = SHORT


def deform() -> None:
    fail("bsafuse deform is not available in this build yet")
