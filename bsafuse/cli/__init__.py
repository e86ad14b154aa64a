"""The `bsafuse` command line: one module per command, each parses -> calls the library -> renders.

Torch is imported only inside the commands that need it, so `bsafuse --help` and `--version`
start instantly.
"""

from __future__ import annotations

from typing import Annotated

import typer

from bsafuse._version import __version__
from bsafuse.cli import deform, evaluate, fuse, register, train, weights
from bsafuse.cli._common import flag

app = typer.Typer(
    name="bsafuse",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals can hold patient metadata
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help=(
        "Register and fuse an unaligned MRI with a CT, PET or SPECT image in one network "
        "(BSAFusion, AAAI 2025). Outputs live in the MRI's pixel grid and geometry."
    ),
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"bsafuse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        flag("--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Register and fuse unaligned medical image pairs (BSAFusion)."""


app.command("fuse", help=fuse.HELP, short_help=fuse.SHORT)(fuse.fuse)
app.command("register", help=register.HELP, short_help=register.SHORT)(register.register)
app.command("deform", help=deform.HELP, short_help=deform.SHORT)(deform.deform)
app.command("evaluate", help=evaluate.HELP, short_help=evaluate.SHORT)(evaluate.evaluate)
app.command("train", help=train.HELP, short_help=train.SHORT)(train.train)
app.add_typer(weights.app, name="weights", help=weights.HELP, short_help=weights.SHORT)


def main() -> None:
    """Console-script entry point (also `python -m bsafuse`, under torchrun too)."""
    from bsafuse._runtime import tune_process

    # before torch loads: OMP_WAIT_POLICY, malloc (see bsafuse/_runtime.py)
    tune_process()
    app()
