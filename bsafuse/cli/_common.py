"""What every command shares: the stderr console, one-line failures, JSON on stdout."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from bsafuse.errors import BsafuseError

# All human-facing output; stdout stays free for --json. No emoji codes: a file named "a:bone:.png"
# must print as it is.
err = Console(stderr=True, highlight=False, emoji=False)

P = ParamSpec("P")
R = TypeVar("R")


def fail(message: str) -> NoReturn:
    """Print one red line on stderr and exit with code 1.

    The message is printed literally: Rich markup in it is escaped (a hint such as
    `pip install "bsafuse[dicom-codecs]"` or a file named `scan[bold].png` must survive), and line
    breaks from library messages are folded so the error stays on one line.
    """
    text = escape(" ".join(message.split()))
    err.print(f"[bold red]error:[/] {text}", markup=True, soft_wrap=True)
    raise typer.Exit(code=1)


def handle_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn expected failures into one red line and exit 1; Ctrl-C into exit 130, no traceback."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except BsafuseError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(code=130) from None

    return wrapper


def print_json(payload: Any) -> None:
    """Write a machine-readable result on stdout (the only thing bsafuse ever prints there)."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


def flag(*names: str, help: str, **options: Any) -> Any:
    """A typer.Option for an on/off flag, shown without a value in --help (no `<bool>`)."""
    return typer.Option(*names, help=help, metavar="", **options)
