"""`bsafuse weights list|path|verify|export`: what is shipped or cached, where, whether it is intact.

`list`, `path` and `verify` do not import torch; `export` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from bsafuse.choices import Prealign
from bsafuse.cli._common import err, fail, flag, handle_errors, print_json

SHORT = "List, locate and verify pretrained checkpoints."
HELP = (
    "List, locate and verify pretrained checkpoints.\n\n"
    "Registered names resolve to the first file found in $BSAFUSE_WEIGHTS_DIR, the user cache, "
    "then the files shipped with bsafuse; every file is sha256-verified."
)
app = typer.Typer(no_args_is_help=True)


@app.command("list")
@handle_errors
def list_(
    json: Annotated[bool, flag("--json", help="Print the table as JSON on stdout.")] = False,
) -> None:
    """Show every checkpoint name, its file, where it was found and whether it is intact."""
    from bsafuse import weights

    rows = list(weights.inventory())
    if json:
        print_json([{**vars(r), "path": str(r.path) if r.path else None} for r in rows])
        return
    table = Table(title="bsafuse checkpoints")
    for column in ("name", "file", "present at", "verified"):
        table.add_column(column)
    for r in rows:
        where = str(r.path) if r.path else "[dim]not found[/]"
        ok = {None: "[dim]-[/]", True: "[green]yes[/]", False: "[red]sha256 mismatch[/]"}[r.verified]
        table.add_row(r.name, r.filename, where, ok)
    err.print(table)
    aliases = [f"{a} = {t}" for a, t in weights.ALIASES.items() if weights.canonical(a) == t]
    if aliases:
        err.print("Names without a version stand for the newest: " + ", ".join(aliases))
    err.print("Searched: " + ", ".join(str(d) for d in weights.search_dirs()))


@app.command("path")
@handle_errors
def path(name: Annotated[str, typer.Argument(help="Registry name, e.g. ct-mri.")]) -> None:
    """Print the local file a registry name resolves to (verified), for scripts."""
    from bsafuse import weights

    typer.echo(str(weights.resolve(name)))


@app.command("verify")
@handle_errors
def verify(
    names: Annotated[
        list[str] | None, typer.Argument(help="Names to check (default: all registered).")
    ] = None,
) -> None:
    """Check the sha256 of every registered checkpoint that is present; exit 1 on a mismatch."""
    from bsafuse import weights

    wanted = [weights.canonical(n) for n in names] if names else list(weights.REGISTRY)
    unknown = [n for n in wanted if n not in weights.REGISTRY]
    if unknown:
        fail(
            f"not registered: {', '.join(unknown)} (registered: {', '.join(weights.REGISTRY)})"
        )
    found = [r for r in weights.inventory() if r.name in wanted and r.path is not None]
    if not found:
        err.print("No registered checkpoint is present; nothing to verify.")
        return
    bad = [r for r in found if not r.verified]
    for r in found:
        err.print(f"{'[green]ok[/]' if r.verified else '[red]BAD[/]'}  {r.name}  {r.path}")
    if bad:
        fail(
            f"{len(bad)} checkpoint(s) do not match their sha256: {', '.join(str(r.path) for r in bad)}; delete them"
        )


@app.command("export")
@handle_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A training checkpoint, e.g. runs/ct/best.pt.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The checkpoint file to write.")],
    half: Annotated[bool, flag("--half", help="Store the weights as float16 (half the size).")] = False,
    still_px: Annotated[
        float | None,
        typer.Option(
            "--still-px",
            help="Calibrate the nearly-aligned rule for these weights: below this mean motion (px at 256 px) "
            "found by the network alone, a small rigid move is not applied (default: the checkpoint's "
            "value, else 2).",
            show_default=False,
        ),
    ] = None,
    prealign: Annotated[
        Prealign | None,
        typer.Option(
            "--prealign",
            help="The pre-alignment `fuse` and `register` run with these weights unless told otherwise "
            "(default: the checkpoint's value, else rigid).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Write a checkpoint for sharing: the model config, weights, --still-px and --prealign; no optimizer
    or training state.

    Prints the file's sha256 (stdout), the value to register or publish beside it.
    """
    from bsafuse import weights

    if still_px is not None and not still_px > 0:
        fail(f"--still-px must be a positive number of pixels (at 256 px), got {still_px:g}")
    digest = weights.export_checkpoint(checkpoint, output, half=half, still_px=still_px, prealign=prealign)
    err.print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB)")
    print(digest)
