"""Running `fuse`/`register` over files and folders: pairing, skipping, writing, reporting.

Folder runs pair files by stem (``16003.png`` with ``16003.png``, ``a.nii.gz`` with ``a.dcm``); each
output takes the fixed file's name (so its format) inside the output folder. A pair is finished
when all of its requested outputs exist; finished pairs are skipped unless ``overwrite``. A bad
pair is recorded with its reason and the run goes on. No input file is ever overwritten, and every
file is written atomically (a temporary name, then ``os.replace``).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from bsafuse.errors import BsafuseError, DeviceError, InputError, OutputError, WeightsError
from bsafuse.io import MedicalImage, read_image, write_image

if TYPE_CHECKING:
    import torch

    from bsafuse.api import FuseResult, Progress
    from bsafuse.device import Precision
    from bsafuse.model import BSAFusion

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".dcm", ".nii", ".nii.gz", ".ima")  # an output path with one of these is a file
Status = Literal["ok", "skipped", "failed"]


@dataclass
class PairOutcome:
    """What happened to one pair."""

    moving: Path | None
    fixed: Path | None
    output: Path
    status: Status
    error: str | None = None
    seconds: float = 0.0
    weights: str | None = None


@dataclass
class FuseReport:
    """The outcome of a `fuse_files` run: one PairOutcome per pair."""

    mode: str
    device: str = ""
    folder: bool = False  # paired two folders (else one pair of files)
    items: list[PairOutcome] = field(default_factory=list)

    @property
    def ok(self) -> list[PairOutcome]:
        return [i for i in self.items if i.status == "ok"]

    @property
    def failed(self) -> list[PairOutcome]:
        return [i for i in self.items if i.status == "failed"]

    @property
    def skipped(self) -> list[PairOutcome]:
        return [i for i in self.items if i.status == "skipped"]

    @property
    def weights(self) -> list[str]:
        """Every checkpoint used in this run (registry names or paths)."""
        return sorted({i.weights for i in self.items if i.weights})

    def to_dict(self) -> dict[str, Any]:
        items = [
            {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(i).items()} for i in self.items
        ]
        return {
            "mode": self.mode,
            "device": self.device,
            "folder": self.folder,
            "weights": self.weights,
            "ok": len(self.ok),
            "skipped": len(self.skipped),
            "failed": len(self.failed),
            "pairs": items,
        }


def pair_stem(path: Path) -> str:
    """The name two files of a pair share: the file name without its (double) suffix."""
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def is_folder_run(moving: Path, fixed: Path, output: Path) -> bool:
    """Two folders and an output without an image suffix: pair the folders' files by stem."""
    return moving.is_dir() and fixed.is_dir() and not output.name.lower().endswith(IMAGE_SUFFIXES)


def pair_folders(
    moving_dir: Path, fixed_dir: Path, pattern: str = "*"
) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """Files of two folders matched by stem -> (pairs, moving files that have no partner)."""

    def files(folder: Path) -> dict[str, list[Path]]:
        found: dict[str, list[Path]] = {}
        for p in sorted(folder.iterdir()):
            if p.is_file() and not p.name.startswith(".") and fnmatch.fnmatch(p.name, pattern):
                found.setdefault(pair_stem(p), []).append(p)
        return found

    moving, fixed = files(moving_dir), files(fixed_dir)
    pairs, orphans = [], []
    for stem, paths in moving.items():
        partners = fixed.get(stem, [])
        if len(paths) == 1 and len(partners) == 1:
            pairs.append((paths[0], partners[0]))
        else:
            orphans.extend(paths)
    return pairs, orphans


def _check_not_input(path: Path, inputs: tuple[Path, ...]) -> None:
    for source in inputs:
        if path.exists() and source.exists() and os.path.samefile(path, source):
            raise OutputError(f"{path} is an input; refusing to overwrite it. Choose another output name")
        if path.resolve() == source.resolve():
            raise OutputError(f"{path} is an input; refusing to overwrite it. Choose another output name")


def save_flow(path: Path, flow: np.ndarray, *, like: MedicalImage | None = None) -> Path:
    """Write a flow atomically: `.npy` as (2, H, W) / (D, 2, H, W) float32, or NIfTI.

    The NIfTI form is a displacement-vector image (intent DISPVECT, shape (X, Y, Z, 1, 2)) in the
    fixed image's voxel order and affine, as bsafuse.io writes the fixed image itself. Its two
    components are bsafuse's (x = column, y = row) displacements in pixels of the fixed image as
    bsafuse reads it (LPS order), not millimetres.
    """
    name = path.name.lower()
    if name.endswith(".npy"):
        from bsafuse.io.atomic import atomic_path

        with atomic_path(path) as tmp:
            np.save(tmp, np.asarray(flow, dtype=np.float32))
        return path
    if name.endswith((".nii", ".nii.gz")):
        return _save_flow_nifti(path, np.asarray(flow, dtype=np.float32), like)
    raise InputError(f"--save-flow {path}: use a .npy or .nii.gz file name")


def _save_flow_nifti(path: Path, flow: np.ndarray, like: MedicalImage | None) -> Path:
    from bsafuse.io.atomic import atomic_path
    from bsafuse.io.image import NiftiLayout, reorder
    from bsafuse.io.nifti import LPS_TO_RAS, nibabel_module

    nib = nibabel_module()
    components = flow if flow.ndim == 3 else flow.transpose(1, 0, 2, 3)  # (2, H, W) or (2, D, H, W)
    xyz = [c.T[:, :, None] if c.ndim == 2 else c.transpose(2, 1, 0) for c in components]
    layout = like.nifti if like is not None else None
    if layout is None:
        world = like.index_to_world() if like is not None else np.eye(4)
        layout = NiftiLayout(LPS_TO_RAS @ world, np.eye(4, dtype=np.int64), xyz[0].shape)
    values = np.stack([reorder(c, layout.index_map) for c in xyz], axis=-1)  # (X, Y, Z, 2)
    values = values.reshape(*values.shape[:3], 1, 2).astype(np.float32)
    image = nib.Nifti1Image(values, layout.affine)
    image.header.set_intent("vector", (), name="bsafuse flow px")
    image.header.set_xyzt_units("mm")
    image.set_sform(layout.affine, code=layout.sform_code or 2)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return path


@dataclass
class Runner:
    """Loads models as needed (one per checkpoint) and runs pairs; see `bsafuse.api.fuse_files`."""

    weights: str | os.PathLike[str]
    model: BSAFusion | None
    device: str | torch.device
    precision: Precision
    prealign: str | None
    mode: Literal["fuse", "register"]
    read_options: dict[str, Any]
    batch_size: int
    progress: Progress | None
    _models: dict[str, BSAFusion] = field(default_factory=dict)

    def run(
        self,
        moving: Path,
        fixed: Path,
        output: Path,
        *,
        pattern: str,
        overwrite: bool,
        save_flow: Path | None,
        save_warped: Path | None,
        report: Path | None,
    ) -> FuseReport:
        from bsafuse.device import pick_device

        result = FuseReport(mode=self.mode, device=str(pick_device(self.device)))
        if not is_folder_run(moving, fixed, output):
            outputs = _Outputs(output, save_flow, save_warped, report)
            result.items.append(self.run_pair(moving, fixed, outputs, single=True))
            return result
        result.folder = True
        if output.exists() and not output.is_dir():
            raise OutputError(f"{output} is a file; a folder run needs an output folder (-o OUT_DIR)")
        for folder in (output, save_flow, save_warped, report):
            if folder is not None and folder.resolve() in (moving.resolve(), fixed.resolve()):
                raise OutputError(f"{folder} is an input folder; write the outputs to another folder")
        pairs, orphans = pair_folders(moving, fixed, pattern)
        if not pairs and not orphans:
            raise InputError(f"no files matching {pattern!r} in {moving}")
        if not pairs:
            raise InputError(
                f"no file in {moving} has a partner of the same name in {fixed}; folder runs pair files by "
                "name. To fuse two DICOM series folders as volumes, name an output file (-o fused.nii.gz)"
            )
        for path in orphans:
            reason = f"no single file named {pair_stem(path)}.* in {fixed}"
            result.items.append(PairOutcome(path, None, output / path.name, "failed", reason))
        for n, (m, f) in enumerate(pairs, start=1):
            stem = pair_stem(f)
            outputs = _Outputs(
                output / f.name,
                save_flow / f"{stem}.npy" if save_flow else None,
                save_warped / f.name if save_warped else None,
                report / f"{stem}.png" if report else None,
            )
            if not overwrite and outputs.finished():
                result.items.append(PairOutcome(m, f, outputs.main, "skipped"))
            else:
                result.items.append(self.run_pair(m, f, outputs, single=False))
            if self.progress is not None:
                self.progress(n, len(pairs), f.name)
        return result

    def run_pair(self, moving: Path, fixed: Path, outputs: _Outputs, *, single: bool) -> PairOutcome:
        """Read, fuse and write one pair; expected failures become a failed outcome."""
        from bsafuse.api import fuse

        start = time.perf_counter()
        used = None
        try:
            outputs.check(moving, fixed)
            window = self.read_options.get("window")
            options = {k: v for k, v in self.read_options.items() if k != "window"}
            moving_img = read_image(moving, window=window, **options)
            fixed_img = read_image(fixed, **options)
            model, used = self._model_for(moving_img)
            step = self.progress if single else None
            res = fuse(
                moving_img,
                fixed_img,
                model,
                precision=self.precision,
                prealign=self.prealign,  # type: ignore[arg-type]
                batch_size=self.batch_size,
                progress=step,
            )
            outputs.write(res, fixed_img, mode=self.mode)
        except (WeightsError, DeviceError):
            raise  # no other pair can escape these: stop the run
        except BsafuseError as exc:
            return PairOutcome(
                moving, fixed, outputs.main, "failed", str(exc), time.perf_counter() - start, used
            )
        except OSError as exc:  # a full disk or an unwritable folder stops this pair, not the run
            message = f"cannot write {exc.filename or outputs.main}: {exc.strerror or exc}"
            return PairOutcome(
                moving, fixed, outputs.main, "failed", message, time.perf_counter() - start, used
            )
        return PairOutcome(moving, fixed, outputs.main, "ok", None, time.perf_counter() - start, used)

    def _model_for(self, moving: MedicalImage) -> tuple[BSAFusion, str]:
        from bsafuse.api import choose_weights, load_model

        if self.model is not None:
            return self.model, str(getattr(self.model, "bsafuse_weights", "model given by the caller"))
        choice = choose_weights(self.weights, moving)
        if choice not in self._models:
            self._models[choice] = load_model(self.weights, self.device, moving=moving)
        return self._models[choice], choice


@dataclass
class _Outputs:
    """The files one pair writes."""

    main: Path
    flow: Path | None = None
    warped: Path | None = None
    report: Path | None = None

    def paths(self) -> list[Path]:
        return [p for p in (self.main, self.flow, self.warped, self.report) if p is not None]

    def finished(self) -> bool:
        return all(p.is_file() for p in self.paths())

    def check(self, *inputs: Path) -> None:
        for p in self.paths():
            _check_not_input(p, inputs)

    def write(self, res: FuseResult, fixed: MedicalImage, *, mode: str) -> None:
        # The main output goes last, so its presence means the pair is complete.
        if self.flow is not None:
            save_flow(self.flow, res.flow, like=fixed)
        if self.warped is not None:
            write_image(self.warped, res.warped, like=fixed)
        if self.report is not None:
            from bsafuse.report import write_report

            write_report(self.report, res, title=fixed.path.name if fixed.path else None)
        write_image(self.main, res.fused if mode == "fuse" else res.warped, like=fixed)
