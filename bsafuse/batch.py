"""Running `fuse`/`register` over files and folders: pairing, skipping, writing, reporting.

Folder runs pair files by stem (``16003.png`` with ``16003.png``, ``a.nii.gz`` with ``a.dcm``); each
output takes the fixed file's name (so its format) inside the output folder. A pair is finished
when all of its requested outputs exist; finished pairs are skipped unless ``overwrite``. A bad
pair is recorded with its reason and the run goes on. No input file is ever overwritten, and every
file is written atomically (a temporary name, then ``os.replace``).

Folder runs stream (`bsafuse.pipeline`): the next pairs are read and finished ones written while the
network computes. Under ``torchrun`` every process takes its own shard of the pairs and rank 0
reports them all (`bsafuse.sharding`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bsafuse.errors import BsafuseError, DeviceError, InputError, OutputError, WeightsError
from bsafuse.flow_files import FLOW_SUFFIXES, save_flow
from bsafuse.io import SUPPORTED as IMAGE_SUFFIXES_OUT
from bsafuse.io import MedicalImage, read_image, write_image
from bsafuse.io.atomic import full_suffix, remove_stale_temporaries
from bsafuse.sharding import Ranked

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
    rank: int = 0  # the torchrun process that handled the pair (0 without torchrun)
    # Slices (0 for a 2-D pair) where the network's flow was dropped because it left the pair
    # less similar than the pre-alignment alone (api.FuseResult.fallback_slices).
    fallback_slices: list[int] = field(default_factory=list)


@dataclass
class FuseReport(Ranked):
    """The outcome of a `fuse_files` run: one PairOutcome per pair."""

    mode: str
    device: str = ""
    folder: bool = False  # paired two folders (else one pair of files)
    items: list[PairOutcome] = field(default_factory=list)
    rank: int = 0  # under torchrun: this process's rank; rank 0's report holds every rank's pairs
    world_size: int = 1  # processes that shared the run

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
            "processes": self.world_size,
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


def _check_writable(path: Path, option: str, suffixes: tuple[str, ...]) -> None:
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


def _check_not_input(path: Path, inputs: tuple[Path, ...]) -> None:
    for source in inputs:
        if path.exists() and source.exists() and os.path.samefile(path, source):
            raise OutputError(f"{path} is an input; refusing to overwrite it. Choose another output name")
        if path.resolve() == source.resolve():
            raise OutputError(f"{path} is an input; refusing to overwrite it. Choose another output name")


@dataclass
class _Job:
    """One pair of a folder run: its place in the sorted pair list and its files."""

    index: int
    moving: Path
    fixed: Path
    outputs: _Outputs


@dataclass
class _Loaded:
    moving: MedicalImage
    fixed: MedicalImage


@dataclass
class Runner:
    """Loads models as needed (one per checkpoint) and runs pairs; see `bsafuse.api.fuse_files`.

    Folder runs stream (bsafuse.pipeline): the next pairs are read and the finished ones written
    while the network computes. Under torchrun each process takes its shard of the pairs
    (bsafuse.sharding) and rank 0 reports them all.
    """

    weights: str | os.PathLike[str]
    model: BSAFusion | None
    device: str | torch.device
    precision: Precision
    prealign: str | None
    mode: Literal["fuse", "register"]
    read_options: dict[str, Any]
    batch_size: int
    progress: Progress | None
    anonymize: bool = False  # DICOM outputs: a new study with empty patient tags (io.write_image)
    ignore_geometry: bool = False  # centre the moving image on the fixed one (api.fuse)
    _models: dict[str, BSAFusion] = field(default_factory=dict)
    _used: dict[int, str] = field(default_factory=dict)  # job index -> weights used
    _fallback: dict[int, list[int]] = field(default_factory=dict)  # job index -> fallback slices
    _rank: int = 0

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
        from bsafuse.sharding import current_shard, device_for

        shard = current_shard()
        self.device = device_for(shard, self.device)
        self._rank = shard.rank
        if not shard.is_main:
            self.progress = None  # one progress bar: rank 0's
        result = FuseReport(
            mode=self.mode, device=str(pick_device(self.device)), rank=shard.rank, world_size=shard.world_size
        )
        if not is_folder_run(moving, fixed, output):
            if shard.is_main:  # one pair: one process does it
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
        if shard.is_main:  # unpaired files are reported once
            for path in orphans:
                reason = f"no single file named {pair_stem(path)}.* in {fixed}"
                result.items.append(PairOutcome(path, None, output / path.name, "failed", reason))
        jobs = [
            _Job(i, m, f, _outputs_for(f, output, save_flow, save_warped, report))
            for i, (m, f) in enumerate(pairs)
            if shard.owns(i)
        ]
        from bsafuse.sharding import Summary

        summary = Summary(shard, self.device)
        try:
            outcomes = self._run_jobs(jobs, overwrite=overwrite)
            gathered = summary.gather([(i, asdict(o)) for i, o in outcomes])
        finally:
            summary.close()
        merged = sorted((i, o) for part in gathered for i, o in part)
        result.items.extend(PairOutcome(**_paths(o)) for _, o in merged)
        return result

    def _run_jobs(self, jobs: list[_Job], *, overwrite: bool) -> list[tuple[int, PairOutcome]]:
        """Skip finished pairs, stream the others; (index, outcome) per job, in job order."""
        from bsafuse.pipeline import stream

        outcomes: dict[int, PairOutcome] = {}
        todo = []
        for job in jobs:
            if not overwrite and job.outputs.finished():
                outcomes[job.index] = PairOutcome(
                    job.moving, job.fixed, job.outputs.main, "skipped", rank=self._rank
                )
            else:
                todo.append(job)
        done = len(outcomes)
        pipeline = stream(
            todo,
            read=self._read,
            compute=self._compute,
            write=self._write,
            recoverable=(BsafuseError, OSError),
        )
        with contextlib.closing(pipeline):  # an error below stops the I/O threads too
            for item in pipeline:
                job = item.job
                outcome = self._outcome(job.moving, job.fixed, job.outputs, item.error, item.seconds, job.index)
                outcomes[job.index] = outcome
                done += 1
                if self.progress is not None:
                    self.progress(done, len(jobs), job.fixed.name)
        return sorted(outcomes.items())

    def run_pair(self, moving: Path, fixed: Path, outputs: _Outputs, *, single: bool) -> PairOutcome:
        """Read, fuse and write one pair; expected failures become a failed outcome."""
        start = time.perf_counter()
        job = _Job(-1, moving, fixed, outputs)
        error: BaseException | None = None
        try:
            self._write(job, self._compute(job, self._read(job), step=self.progress if single else None))
        except (BsafuseError, OSError) as exc:
            error = exc
        return self._outcome(
            moving, fixed, outputs, error, time.perf_counter() - start, job.index
        )

    def _read(self, job: _Job) -> _Loaded:
        job.outputs.check(job.moving, job.fixed)
        window = self.read_options.get("window")
        options = {k: v for k, v in self.read_options.items() if k != "window"}
        return _Loaded(read_image(job.moving, window=window, **options), read_image(job.fixed, **options))

    def _compute(
        self, job: _Job, loaded: _Loaded, step: Progress | None = None
    ) -> tuple[FuseResult, _Loaded]:
        from bsafuse.api import fuse

        model, self._used[job.index] = self._model_for(loaded.moving)
        res = fuse(
            loaded.moving,
            loaded.fixed,
            model,
            precision=self.precision,
            prealign=self.prealign,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            progress=step,
            ignore_geometry=self.ignore_geometry,
        )
        self._fallback[job.index] = list(res.fallback_slices)
        return res, loaded

    def _write(self, job: _Job, computed: tuple[FuseResult, _Loaded]) -> None:
        res, loaded = computed
        job.outputs.write(res, loaded, mode=self.mode, anonymize=self.anonymize)

    def _outcome(
        self,
        moving: Path,
        fixed: Path,
        outputs: _Outputs,
        error: BaseException | None,
        seconds: float,
        index: int,
    ) -> PairOutcome:
        """The outcome of job `index`, with what its computation recorded (weights, fallback)."""
        used, fallback = self._used.pop(index, None), self._fallback.pop(index, [])
        if isinstance(error, (WeightsError, DeviceError)):
            raise error  # no other pair can escape these: stop the run
        if isinstance(error, OSError):  # a full disk or an unwritable folder stops this pair, not the run
            message = f"cannot write {error.filename or outputs.main}: {error.strerror or error}"
            return PairOutcome(moving, fixed, outputs.main, "failed", message, seconds, used, self._rank)
        if error is not None:
            return PairOutcome(moving, fixed, outputs.main, "failed", str(error), seconds, used, self._rank)
        return PairOutcome(moving, fixed, outputs.main, "ok", None, seconds, used, self._rank, fallback)

    def _model_for(self, moving: MedicalImage) -> tuple[BSAFusion, str]:
        from bsafuse.api import choose_weights, load_model

        if self.model is not None:
            return self.model, str(getattr(self.model, "bsafuse_weights", "model given by the caller"))
        choice = choose_weights(self.weights, moving)
        if choice not in self._models:
            self._models[choice] = load_model(self.weights, self.device, moving=moving)
        return self._models[choice], choice


def _outputs_for(
    fixed: Path, output: Path, save_flow: Path | None, save_warped: Path | None, report: Path | None
) -> _Outputs:
    """The files a folder run writes for the pair whose fixed image is `fixed`."""
    stem = pair_stem(fixed)
    return _Outputs(
        output / fixed.name,
        save_flow / f"{stem}.npy" if save_flow else None,
        save_warped / fixed.name if save_warped else None,
        report / f"{stem}.png" if report else None,
    )


def _paths(outcome: dict[str, Any]) -> dict[str, Any]:
    """A PairOutcome's fields from `asdict` (as gathered from another process), paths restored."""
    return {
        k: Path(v) if k in ("moving", "fixed", "output") and v is not None else v for k, v in outcome.items()
    }


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
        """Refuse, before any work, outputs that overwrite an input or each other, or cannot be written."""
        seen: dict[Path, str] = {}
        for option, path, suffixes in (
            ("-o", self.main, IMAGE_SUFFIXES_OUT),
            ("--save-flow", self.flow, FLOW_SUFFIXES),
            ("--save-warped", self.warped, IMAGE_SUFFIXES_OUT),
            ("--report", self.report, (".png",)),
        ):
            if path is None:
                continue
            _check_not_input(path, inputs)
            if path.resolve() in seen:
                raise OutputError(
                    f"{option} {path} is also the {seen[path.resolve()]} output; give each output its own name"
                )
            seen[path.resolve()] = option
            _check_writable(path, option, suffixes)
            remove_stale_temporaries(path)  # left by a run killed mid-write

    def write(self, res: FuseResult, loaded: _Loaded, *, mode: str, anonymize: bool) -> None:
        # The main output goes last, so its presence means the pair is complete; if any write
        # fails, the side outputs this call wrote are removed again (no half-finished pair).
        fixed, moving = loaded.fixed, loaded.moving.modality or "moving image"
        onto = f"onto {fixed.modality or 'the fixed image'}"
        descriptions = {"fuse": f"bsafuse fusion of {moving} {onto}", "register": f"bsafuse: {moving} registered {onto}"}
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
            write_image(
                self.main,
                res.fused if mode == "fuse" else res.warped,
                like=fixed,
                anonymize=anonymize,
                description=descriptions[mode],
            )
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
