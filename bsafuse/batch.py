"""Running `fuse`/`register` over files and folders: pairing, skipping, writing, reporting.

Folder runs pair files by stem (`bsafuse.pairing`); each output takes the fixed file's name (so
its format) inside the output folder (`bsafuse.outputs`). A pair is finished when all of its
requested outputs exist; finished pairs are skipped unless ``overwrite``. A bad pair is recorded
with its reason and the run goes on. No input file is ever overwritten, and every file is written
atomically.

Folder runs stream (`bsafuse.pipeline`): the next pairs are read and finished ones written while the
network computes. Under ``torchrun`` every process takes its own shard of the pairs and rank 0
reports them all (`bsafuse.torchrun`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bsafuse.errors import BsafuseError, DeviceError, InputError, OutputError, WeightsError
from bsafuse.io import MedicalImage, read_image
from bsafuse.loading import choose, load_model, provenance_of
from bsafuse.outputs import FILE_SUFFIXES, PairOutputs
from bsafuse.pairing import pair_folders, pair_stem
from bsafuse.results import FuseReport, FuseResult, PairOutcome

if TYPE_CHECKING:
    import torch

    from bsafuse.api import Progress
    from bsafuse.choices import Mode, Prealign, Precision
    from bsafuse.model import BSAFusion

log = logging.getLogger(__name__)


def is_folder_run(moving: Path, fixed: Path, output: Path) -> bool:
    """Two folders and an output without an image suffix: pair the folders' files by stem."""
    return moving.is_dir() and fixed.is_dir() and not output.name.lower().endswith(FILE_SUFFIXES)


@dataclass
class _Job:
    """One pair of a folder run: its place in the sorted pair list and its files."""

    index: int
    moving: Path
    fixed: Path
    outputs: PairOutputs


@dataclass
class _Loaded:
    moving: MedicalImage
    fixed: MedicalImage


@dataclass
class Runner:
    """Loads models as needed (one per checkpoint) and runs pairs; see `fuse_files` below.

    Folder runs stream (bsafuse.pipeline): the next pairs are read and the finished ones written
    while the network computes. Under torchrun each process takes its shard of the pairs
    (bsafuse.torchrun) and rank 0 reports them all.
    """

    weights: str | os.PathLike[str]
    model: BSAFusion | None
    device: str | torch.device
    precision: Precision
    prealign: Prealign | None
    mode: Mode
    read_options: dict[str, Any]
    batch_size: int
    progress: Progress | None
    anonymize: bool = False  # DICOM outputs: a new study with empty patient tags (io.write_image)
    ignore_geometry: bool = False  # centre the moving image on the fixed one (api.fuse)
    _models: dict[str, BSAFusion] = field(default_factory=dict)
    _used: dict[int, str] = field(default_factory=dict)  # job index -> weights used
    # job index -> (fallback_slices, prealign_skipped, prealign) of its FuseResult
    _slices: dict[int, tuple[list[int], list[int], str]] = field(default_factory=dict)
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
        from bsafuse.torchrun import device_for, placement

        shard = placement()
        self.device = device_for(shard, self.device)
        self._rank = shard.rank
        if not shard.is_main:
            self.progress = None  # one progress bar: rank 0's
        result = FuseReport(
            mode=self.mode,
            device=str(self.device),  # device_for resolved it
            processes=shard.world_size,
            is_main=shard.is_main,
        )
        if not is_folder_run(moving, fixed, output):
            if shard.is_main:  # one pair: one process does it
                outputs = PairOutputs(output, save_flow, save_warped, report)
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
            _Job(i, m, f, PairOutputs.in_folders(f, output, save_flow, save_warped, report))
            for i, (m, f) in enumerate(pairs)
            if shard.owns(i)
        ]
        from bsafuse.torchrun import ProcessGroup

        summary = ProcessGroup(shard, self.device)
        try:
            outcomes = self._run_jobs(jobs, overwrite=overwrite)
            gathered = summary.gather([(i, o.to_dict()) for i, o in outcomes])
        finally:
            summary.close()
        merged = sorted((i, o) for part in gathered for i, o in part)
        result.items.extend(PairOutcome.from_dict(o) for _, o in merged)
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

    def run_pair(self, moving: Path, fixed: Path, outputs: PairOutputs, *, single: bool) -> PairOutcome:
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
            prealign=self.prealign,
            batch_size=self.batch_size,
            progress=step,
            ignore_geometry=self.ignore_geometry,
        )
        self._slices[job.index] = (list(res.fallback_slices), list(res.prealign_skipped), res.prealign)
        return res, loaded

    def _write(self, job: _Job, computed: tuple[FuseResult, _Loaded]) -> None:
        res, loaded = computed
        job.outputs.write(res, loaded.moving, loaded.fixed, mode=self.mode, anonymize=self.anonymize)

    def _outcome(
        self,
        moving: Path,
        fixed: Path,
        outputs: PairOutputs,
        error: BaseException | None,
        seconds: float,
        index: int,
    ) -> PairOutcome:
        """The outcome of job `index`, with what its computation recorded (weights, fallback)."""
        used, recorded = self._used.pop(index, None), self._slices.pop(index, None)
        if isinstance(error, (WeightsError, DeviceError)):
            raise error  # no other pair can escape these: stop the run
        if isinstance(error, OSError):  # a full disk or an unwritable folder stops this pair, not the run
            message = f"cannot write {error.filename or outputs.main}: {error.strerror or error}"
            return PairOutcome(moving, fixed, outputs.main, "failed", message, seconds, used, self._rank)
        if error is not None:
            return PairOutcome(moving, fixed, outputs.main, "failed", str(error), seconds, used, self._rank)
        fallback, skipped, prealign = recorded or ([], [], None)
        return PairOutcome(
            moving, fixed, outputs.main, "ok", None, seconds, used, self._rank, fallback, skipped, prealign
        )

    def _model_for(self, moving: MedicalImage) -> tuple[BSAFusion, str]:
        """The model for this moving image (one load per checkpoint) and how reports name it."""
        if self.model is not None:
            return self.model, provenance_of(self.model).label
        choice = choose(self.weights, moving)
        if choice not in self._models:
            self._models[choice] = load_model(self.weights, self.device, moving=moving)
        return self._models[choice], provenance_of(self._models[choice]).label


def fuse_files(
    moving: str | os.PathLike[str],
    fixed: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] = "auto",
    model: BSAFusion | None = None,
    device: str | torch.device = "auto",
    precision: Precision = "fp32",
    prealign: Prealign | None = None,
    mode: Mode = "fuse",
    pattern: str = "*",
    overwrite: bool = False,
    save_flow: str | os.PathLike[str] | None = None,
    save_warped: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    read_options: dict[str, Any] | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
    anonymize: bool = False,
    ignore_geometry: bool = False,
) -> FuseReport:
    """Fuse files (or register them, with mode="register") and write the outputs.

    Two files (or two DICOM series folders with an output file name) make one pair. Two folders
    with an output folder pair their files by stem (`pattern` filters them): finished pairs are
    skipped unless `overwrite`, a bad pair is recorded and the rest still run. A DICOM output is a
    derived series of the fixed image's study (same study and frame of reference, its patient tags),
    or, with `anonymize`, of a new study with empty patient tags. `save_flow`,
    `save_warped` and `report` are files for one pair and folders for folder runs. Every write is
    atomic and no input is ever overwritten. Returns a FuseReport; failures are in it, not raised
    (except for problems that stop the whole run, such as missing weights).
    """
    runner = Runner(
        weights=weights,
        model=model,
        device=device,
        precision=precision,
        prealign=prealign,
        mode=mode,
        read_options=read_options or {},
        batch_size=batch_size,
        progress=progress,
        anonymize=anonymize,
        ignore_geometry=ignore_geometry,
    )
    return runner.run(
        Path(moving),
        Path(fixed),
        Path(output),
        pattern=pattern,
        overwrite=overwrite,
        save_flow=_opt_path(save_flow),
        save_warped=_opt_path(save_warped),
        report=_opt_path(report),
    )


def _opt_path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value)
