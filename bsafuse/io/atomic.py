"""Atomic file writes: a temporary file beside the target, then `os.replace`.

A reader never sees a half-written output, and an interrupted or failed write leaves the old file
(if any) untouched and no temporary file behind.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bsafuse.errors import OutputError

MULTI_SUFFIXES = (".nii.gz",)  # kept whole on the temporary name: writers pick compression from it


def full_suffix(path: Path) -> str:
    """The suffix that decides the format: '.nii.gz' for a gzipped NIfTI, else the last one (lower case)."""
    name = path.name.lower()
    for suffix in MULTI_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _temporary_name(target: Path, token: str) -> str:
    return f".{target.name}.{token}.tmp{full_suffix(target)}"


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries a killed writer of `path` left behind (kill -9 skips every cleanup).

    Only names `atomic_path` makes for this very target (``.NAME.<8 hex>.tmp<suffix>``) are removed,
    so other files in the folder are never touched. Returns what was removed.
    """
    target = Path(path)
    if not target.parent.is_dir():
        return []
    head, tail = f".{target.name}.", f".tmp{full_suffix(target)}"
    removed = []
    for candidate in target.parent.iterdir():
        name = candidate.name
        token = name[len(head) : len(name) - len(tail)]
        if (
            name.startswith(head)
            and name.endswith(tail)
            and len(name) == len(head) + 8 + len(tail)
            and all(c in "0123456789abcdef" for c in token)
            and candidate.is_file()
        ):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary path in `path`'s folder; move it onto `path` when the block succeeds.

    The temporary name keeps the target's suffix (libraries such as nibabel pick the format from it)
    and is created with the usual permissions (0666 less the umask). On any exception, including
    KeyboardInterrupt, the temporary file is removed and the exception propagates; an `OSError`
    (unwritable folder, disk full) becomes an `OutputError` naming `path`.

    Example:
        with atomic_path("out/fused.png") as tmp:
            image.save(tmp, format="PNG")
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(_temporary_name(target, secrets.token_hex(4)))
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise OutputError(
            f"cannot write {target}: {exc.strerror or exc}; check the folder exists and is writable"
        ) from exc
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
