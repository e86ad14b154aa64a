"""`bsafuse fuse` (being written)."""

from __future__ import annotations

from bsafuse.cli._common import fail

SHORT = "(not available yet)"
HELP = SHORT


def fuse() -> None:
    fail("bsafuse fuse is not available in this build yet")
