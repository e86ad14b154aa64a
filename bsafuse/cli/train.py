"""`bsafuse train` (being written)."""

from __future__ import annotations

from bsafuse.cli._common import fail

SHORT = "(not available yet)"
HELP = SHORT


def train() -> None:
    fail("bsafuse train is not available in this build yet")
