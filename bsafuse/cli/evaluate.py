"""`bsafuse evaluate` (being written)."""

from __future__ import annotations

from bsafuse.cli._common import fail

SHORT = "(not available yet)"
HELP = SHORT


def evaluate() -> None:
    fail("bsafuse evaluate is not available in this build yet")
