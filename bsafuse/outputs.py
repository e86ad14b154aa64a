"""The files one pair writes: their names, the checks made before any work, and writing them.

No input is ever overwritten, two outputs never share a name, and every file is written
atomically (a temporary name, then ``os.replace``). The main output goes last, so its presence
means the pair is complete: a folder run skips the pairs whose outputs all exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bsafuse.errors import OutputError
from bsafuse.flow_files import FLOW_SUFFIXES, save_flow
from bsafuse.io import SUPPORTED, MedicalImage, write_image
from bsafuse.io.atomic import full_suffix, remove_stale_temporaries
from bsafuse.pairing import pair_stem

if TYPE_CHECKING:
    from bsafuse.results import FuseResult

# An output path ending in one of these names a file (else, for two input folders, a folder).
FILE_SUFFIXES = (*SUPPORTED, ".ima")


def check_writable(path: Path, option: str, suffixes: tuple[str, ...]) -> None:
    """An output path that can be written: a known suffix, not a folder, a folder that allows it."""
    if path.is_dir():
        raise OutputError(
            f"{option} {path} is a folder; one pair writes one file: give a file name "
            f"(e.g. {path / ('fused' + suffixes[0])})"
        )
    if not path.name.lower().endswith(suffixes):
        found = f"{full_suffix(path)} is not an output format" if full_suffix(path) else "the name has no suffix"
        raise OutputError(f"{option} {path}: {found}; use one of {', '.join(suffixes)}")
    folder = path.parent  # created when the output is written; its nearest existing ancestor must allow it
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{option} {path}: {folder} is a file, not a folder; choose another place")
    if (path.exists() and not os.access(path, os.W_OK)) or not os.access(folder, os.W_OK):
        raise OutputError(f"{option} {path}: no permission to write in {folder}; choose another place")


def check_not_input(path: Path, inputs: tuple[Path, ...]) -> None:
    for source in inputs:
        same = path.exists() and source.exists() and os.path.samefile(path, source)
        if same or path.resolve() == source.resolve():
            raise OutputError(f"{path} is an input; refusing to overwrite it. Choose another output name")


@dataclass
class PairOutputs:
    """The files one pair writes: the main output, optionally the flow, warped image and report."""

    main: Path
    flow: Path | None = None
    warped: Path | None = None
    report: Path | None = None

    @classmethod
    def in_folders(
        cls, fixed: Path, output: Path, flow: Path | None, warped: Path | None, report: Path | None
    ) -> PairOutputs:
        """A folder run's files for the pair whose fixed image is `fixed` (named after it)."""
        stem = pair_stem(fixed)
        return cls(
            output / fixed.name,
            flow / f"{stem}.npy" if flow else None,
            warped / fixed.name if warped else None,
            report / f"{stem}.png" if report else None,
        )

    def paths(self) -> list[Path]:
        return [p for p in (self.main, self.flow, self.warped, self.report) if p is not None]

    def finished(self) -> bool:
        return all(p.is_file() for p in self.paths())

    def check(self, *inputs: Path) -> None:
        """Refuse, before any work, outputs that overwrite an input or each other, or cannot be written."""
        seen: dict[Path, str] = {}
        for option, path, suffixes in (
            ("-o", self.main, SUPPORTED),
            ("--save-flow", self.flow, FLOW_SUFFIXES),
            ("--save-warped", self.warped, SUPPORTED),
            ("--report", self.report, (".png",)),
        ):
            if path is None:
                continue
            check_not_input(path, inputs)
            if path.resolve() in seen:
                raise OutputError(
                    f"{option} {path} is also the {seen[path.resolve()]} output; give each output its own name"
                )
            seen[path.resolve()] = option
            check_writable(path, option, suffixes)
            remove_stale_temporaries(path)  # left by a run killed mid-write

    def write(
        self, res: FuseResult, moving: MedicalImage, fixed: MedicalImage, *, mode: str, anonymize: bool
    ) -> None:
        """Write every output; if one fails, the side outputs already written are removed again."""
        what, onto = moving.modality or "moving image", f"onto {fixed.modality or 'the fixed image'}"
        descriptions = {"fuse": f"bsafuse fusion of {what} {onto}", "register": f"bsafuse: {what} registered {onto}"}
        written: list[Path] = []
        try:
            if self.flow is not None:
                save_flow(self.flow, res.flow, like=fixed)
                written.append(self.flow)
            if self.warped is not None:
                write_image(
                    self.warped, res.warped, like=fixed, anonymize=anonymize, description=descriptions["register"]
                )
                written.append(self.warped)
            if self.report is not None:
                from bsafuse.report import write_report

                write_report(self.report, res, title=fixed.path.name if fixed.path else None)
                written.append(self.report)
            image = res.fused if mode == "fuse" else res.warped
            write_image(self.main, image, like=fixed, anonymize=anonymize, description=descriptions[mode])
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
