"""Pair naming: the files of two folders are paired by stem, wherever bsafuse pairs folders.

A stem is the file name without its suffix, a double one for ``.nii.gz``: ``16003.png`` pairs with
``16003.png``, ``a.nii.gz`` with ``a.dcm``. `fuse`/`register` folder runs, training data and the
evaluation protocol all pair this way.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from bsafuse.io import SUPPORTED


def pair_stem(path: Path) -> str:
    """The name two files of a pair share: the file name without its (double) suffix."""
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def files_by_stem(folder: Path, pattern: str = "*") -> dict[str, list[Path]]:
    """The visible files of `folder` matching `pattern`, grouped by stem, in name order."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and fnmatch.fnmatch(path.name, pattern):
            found.setdefault(pair_stem(path), []).append(path)
    return found


def images_by_stem(folder: Path) -> dict[str, Path]:
    """The image files of `folder` (a suffix bsafuse reads: io.SUPPORTED) by stem, in name order.

    Data folders hold one image per name; of two files sharing a stem, the later name is kept.
    """
    return {
        stem: paths[-1]
        for stem, all_paths in files_by_stem(folder).items()
        if (paths := [p for p in all_paths if p.name.lower().endswith(SUPPORTED)])
    }


def pair_folders(
    moving_dir: Path, fixed_dir: Path, pattern: str = "*"
) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """Files of two folders matched by stem -> (pairs, moving files without exactly one partner)."""
    moving, fixed = files_by_stem(moving_dir, pattern), files_by_stem(fixed_dir, pattern)
    pairs, orphans = [], []
    for stem, paths in moving.items():
        partners = fixed.get(stem, [])
        if len(paths) == 1 and len(partners) == 1:
            pairs.append((paths[0], partners[0]))
        else:
            orphans.extend(paths)
    return pairs, orphans
