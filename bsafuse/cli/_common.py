"""What every command shares: the stderr console, one-line failures, JSON on stdout."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console

from bsafuse.errors import BsafuseError

err = Console(stderr=True, highlight=False)  # all human-facing output; stdout stays free for --json

P = ParamSpec("P")
R = TypeVar("R")


def fail(message: str) -> NoReturn:
    """Print one red line on stderr and exit with code 1."""
    err.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
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
