"""`bsafuse weights list|path|verify` (being written)."""

from __future__ import annotations

import typer

SHORT = "List, locate and verify pretrained checkpoints."
HELP = SHORT
app = typer.Typer(no_args_is_help=True)
