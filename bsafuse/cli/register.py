"""`bsafuse register` (being written)."""

from __future__ import annotations

from bsafuse.cli._common import fail

SHORT = "(not available yet)"
HELP = SHORT


def register() -> None:
    fail("bsafuse register is not available in this build yet")
