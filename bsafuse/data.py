"""Training data: aligned pairs from a data folder, misaligned on the fly (design.md §4 and §7).

A data folder holds `MRI/` (the fixed images, B) and one more sub-folder, the moving modality
(`CT/`, `PET/` or `SPECT/`, A), with same-named images, exactly as tests/data/harvard/CT-MRI.
A folder holding several such pair folders (`CT-MRI/`, `PET-MRI/`, ...) is accepted with `pair=`.
Colour moving images (PET/SPECT pseudo-colour) are reduced to their Y channel (BT.601, the
network's input); an RGB fixed image is refused.

Names `<case><3-digit slice>` (16003 = case 16, slice 3) are split into training and validation
*by case*: neighbouring slices of one case are nearly alike. A name that does not start that way
is a case of its own.

Every image is read once, brought to the working size exactly as inference does
(`bsafuse.working_size`: grey or luma, padded to a centred square, resized), and kept in memory. `MisalignedPairs` makes the misalignment per item: the aligned pair is augmented
(flips, 90-degree turns, both images alike) and the moving image deformed with `deform.py`,
giving (moving, fixed, label = the aligned moving image, flow = ground truth with
``warp(moving, flow) ~= label``). Its randomness comes from a generator seeded by
(seed, epoch, index) alone, so the items of an epoch are the same whatever the number of
DataLoader workers or processes, and an epoch re-run after a resume draws exactly the same data.
Validation items use epoch 0 of a separate stream and no augmentation: one fixed deformation per
item, so validation numbers compare across epochs and runs with the same seed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Sampler

from bsafuse.choices import REFERENCE_SIZE
from bsafuse.deform import DeformParams, augment_pair, random_deformation
from bsafuse.errors import InputError
from bsafuse.io import SUPPORTED
from bsafuse.pairing import images_by_stem
from bsafuse.working_size import split_luma, to_working

log = logging.getLogger(__name__)

FIXED_FOLDER = "MRI"
# REFERENCE_SIZE (bsafuse.choices): the size deformation amplitudes (DeformParams) are given for
_CASE_SLICE = re.compile(r"(\d+)(\d{3})(?!\d)")
_TRAIN_STREAM, _VAL_STREAM, _SPLIT_STREAM = 0, 1, 2


def case_of(name: str) -> str:
    """The case of an image name: '16003' -> '16', '2004' -> '2'; other names are their own case."""
    match = _CASE_SLICE.match(name)
    return str(int(match.group(1))) if match else name


def find_pair_folder(data_dir: Path, pair: str | None = None) -> tuple[Path, Path]:
    """(moving folder, fixed folder) of a data folder laid out as design.md §7."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"data folder {data_dir} does not exist or is not a folder")
    if pair is not None and not (data_dir / FIXED_FOLDER).is_dir():
        wanted = pair.upper()
        nested = [d for d in data_dir.iterdir() if d.is_dir() and d.name.upper() == wanted]
        if not nested:
            raise InputError(f"{data_dir} has no sub-folder {wanted!r} (asked for by --pair {pair})")
        data_dir = nested[0]
    if not (data_dir / FIXED_FOLDER).is_dir():
        inside = ", ".join(sorted(d.name for d in data_dir.iterdir() if d.is_dir())) or "no folders"
        raise InputError(
            f"{data_dir} has no {FIXED_FOLDER}/ folder (found: {inside}); a data folder holds {FIXED_FOLDER}/ "
            "and one moving-modality folder (CT/, PET/ or SPECT/) of same-named images, "
            "or give the folder of pair folders with --pair (e.g. --pair ct-mri)"
        )
    others = sorted(
        d for d in data_dir.iterdir() if d.is_dir() and d.name != FIXED_FOLDER and not d.name.startswith(".")
    )
    if pair is not None:
        modality = pair.split("-")[0].upper()
        others = [d for d in others if d.name.upper() == modality] or others
    if len(others) != 1:
        names = ", ".join(d.name for d in others) or "none"
        raise InputError(
            f"{data_dir} must hold exactly one moving-modality folder beside {FIXED_FOLDER}/ (found: {names}); "
            "remove the others or name the pair with --pair (e.g. --pair ct-mri)"
        )
    return others[0], data_dir / FIXED_FOLDER


def list_pairs(moving_dir: Path, fixed_dir: Path) -> list[str]:
    """Names present in both folders, sorted; names in only one folder are skipped with a warning."""
    moving, fixed = images_by_stem(moving_dir), images_by_stem(fixed_dir)
    names = sorted(set(moving) & set(fixed))
    lonely = sorted(set(moving) ^ set(fixed))
    if lonely:
        log.warning("%d image(s) have no partner and are skipped: %s", len(lonely), ", ".join(lonely[:5]))
    if not names:
        raise InputError(
            f"{moving_dir} and {fixed_dir} have no image names in common; a pair is the same file name "
            f"in both folders ({', '.join(SUPPORTED)})"
        )
    return names


def split_by_case(
    names: Sequence[str], *, val_cases: Sequence[str] | None = None, val_fraction: float = 0.15, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(training names, validation names), split by case.

    `val_cases` names the validation cases; otherwise round(val_fraction * number of cases) cases
    (at least one when val_fraction > 0) are drawn with `seed`. 0 gives no validation set.
    """
    cases = sorted({case_of(n) for n in names}, key=lambda c: (len(c), c))
    if val_cases is not None:
        wanted = [str(int(c)) if c.isdigit() else c for c in (c.strip() for c in val_cases) if c]
        unknown = [c for c in wanted if c not in cases]
        if unknown:
            raise InputError(
                f"--val-cases {','.join(unknown)}: no such case in the data (cases: {', '.join(cases)})"
            )
        chosen = set(wanted)
    else:
        if not 0 <= val_fraction < 1:
            raise InputError(f"--val-fraction must be in [0, 1), got {val_fraction}")
        count = 0 if val_fraction == 0 else max(1, round(val_fraction * len(cases)))
        order = torch.randperm(len(cases), generator=item_generator(seed, _SPLIT_STREAM, 0, 0)).tolist()
        chosen = {cases[i] for i in order[:count]}
    train = [n for n in names if case_of(n) not in chosen]
    val = [n for n in names if case_of(n) in chosen]
    if not train:
        raise InputError(
            f"the validation cases ({', '.join(sorted(chosen))}) are all the cases there are; "
            "leave at least one case for training"
        )
    return train, val


@dataclass(frozen=True)
class PairSet:
    """Aligned pairs held in memory at the working size. moving/fixed: (N, 1, S, S) float32 in [0, 1]."""

    names: tuple[str, ...]
    moving: Tensor
    fixed: Tensor
    modality: str  # name of the moving folder, e.g. "CT"

    def subset(self, names: Sequence[str]) -> PairSet:
        index = {n: i for i, n in enumerate(self.names)}
        rows = torch.tensor([index[n] for n in names], dtype=torch.long)
        return PairSet(tuple(names), self.moving[rows], self.fixed[rows], self.modality)


def _grey(pixels: np.ndarray, *, path: Path, moving: bool) -> np.ndarray:
    colour = pixels.ndim == 3 and pixels.shape[-1] == 3
    if colour and not moving:
        raise InputError(f"{path} is a colour image; the fixed image (MRI) must be grey")
    grey, _ = split_luma(pixels, colour=colour)
    if grey.ndim != 2:
        raise InputError(f"{path} is not a 2-D slice (pixels {pixels.shape}); training takes 2-D image pairs")
    return grey


def _working(image: np.ndarray, size: int) -> Tensor:
    """(H, W) -> (S, S) float32, prepared as for inference (working_size.to_working)."""
    square = to_working(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None], size)
    return square[0, 0].clamp(0, 1)


def load_pairs(moving_dir: Path, fixed_dir: Path, names: Sequence[str], *, image_size: int) -> PairSet:
    """Read every pair once, as grey (Y) float32 at image_size x image_size."""
    from bsafuse.io import read_image

    moving_files, fixed_files = images_by_stem(moving_dir), images_by_stem(fixed_dir)
    movings, fixeds = [], []
    for name in names:
        m_img, f_img = read_image(moving_files[name]), read_image(fixed_files[name])
        m = _grey(m_img.pixels, path=moving_files[name], moving=True)
        f = _grey(f_img.pixels, path=fixed_files[name], moving=False)
        if m.shape != f.shape:
            raise InputError(
                f"pair {name!r}: {moving_files[name]} is {m.shape} but {fixed_files[name]} is {f.shape}; "
                "aligned training pairs must have the same size"
            )
        movings.append(_working(m, image_size))
        fixeds.append(_working(f, image_size))
    return PairSet(tuple(names), torch.stack(movings)[:, None], torch.stack(fixeds)[:, None], moving_dir.name)


def scaled_deform(params: DeformParams, image_size: int) -> DeformParams:
    """Pixel amplitudes given for 256 px, rescaled for another working size (angles and scale kept)."""
    k = image_size / REFERENCE_SIZE
    return replace(
        params,
        translate_px=params.translate_px * k,
        elastic_px=params.elastic_px * k,
        elastic_spacing_px=max(4.0, params.elastic_spacing_px * k),
    )


def item_generator(seed: int, stream: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, stream, epoch, index) alone (independent of workers)."""
    state = np.random.SeedSequence([seed, stream, epoch, index]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class MisalignedPairs(Dataset[dict[str, Tensor]]):
    """Items (moving, fixed, label, flow, index) made from aligned pairs; keys are (epoch, index).

    Shapes per item: moving, fixed, label (1, S, S); flow (2, S, S) with warp(moving, flow) ~= label.
    `train=True` augments (flips and 90-degree turns, per `params`) and draws a fresh deformation
    for every (epoch, index); `train=False` gives one fixed deformation per index, no augmentation.
    """

    def __init__(
        self, pairs: PairSet, *, params: DeformParams, seed: int, train: bool, ramp_epochs: int = 0
    ) -> None:
        self.pairs, self.params, self.seed, self.train = pairs, params, seed, train
        self.ramp_epochs = ramp_epochs  # a curriculum: see `params_of`

    def __len__(self) -> int:
        return len(self.pairs.names)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if not self.train:
            epoch = 0
        g = item_generator(self.seed, _TRAIN_STREAM if self.train else _VAL_STREAM, epoch, index)
        label, fixed = self.pairs.moving[index : index + 1], self.pairs.fixed[index : index + 1]
        if self.train and (self.params.flip or self.params.rot90):
            label, fixed = augment_pair(label, fixed, g, flip=self.params.flip, rot90=self.params.rot90)
        moving, flow = random_deformation(label, params=self.params_of(epoch), generator=g)
        return {
            "moving": moving[0].clamp(0, 1),
            "fixed": fixed[0],
            "label": label[0],
            "flow": flow[0],
            "index": torch.tensor(index),
        }

    def params_of(self, epoch: int) -> DeformParams:
        """The deformation of training epoch `epoch` (from 0): with ``ramp_epochs`` R > 0 the
        amplitudes grow linearly, (epoch + 1) / R of `params` up to epoch R - 1 (a curriculum of
        deformation size); validation items always get the full `params`."""
        if not self.train or epoch + 1 >= self.ramp_epochs:
            return self.params
        return self.params.scaled_by((epoch + 1) / self.ramp_epochs)

    def materialise(self, indices: Sequence[int] | None = None) -> dict[str, Tensor]:
        """All (or the given) items stacked into batched tensors (for the small validation set)."""
        rows = range(len(self)) if indices is None else indices
        items = [self[(0, i)] for i in rows]
        if not items:
            return {}
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, index) keys in DistributedSampler order, this rank's share, from `skip` on.

    One process uses the same order with one replica, so 1 and N processes see the same global
    batches (up to the split of each batch across processes). Set the epoch before iterating.
    """

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        indices = range(size)
        self._base: DistributedSampler[int] = DistributedSampler(
            indices,  # type: ignore[arg-type]  # any sized sequence will do
            num_replicas=world_size,
            rank=rank,
            shuffle=True,
            seed=seed,
        )
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, *, skip: int = 0) -> None:
        """Start `epoch`, leaving out its first `skip` keys of this rank (to resume mid-epoch)."""
        self.epoch, self.skip = epoch, skip
        self._base.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self._base):
            if position >= self.skip:
                yield self.epoch, index

    def __len__(self) -> int:
        return max(0, len(self._base) - self.skip)

    def steps(self, batch_size: int) -> int:
        """Batches in a full epoch of this rank."""
        return math.ceil(len(self._base) / batch_size)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_sigint(worker_id: int) -> None:
    """DataLoader worker_init_fn: leave Ctrl-C and SIGTERM to the main process, which stops at a step
    boundary and saves. `timeout` and job schedulers signal the whole process group; a worker that
    died of SIGTERM would turn the orderly stop into a DataLoader error.

    Workers are born with both signals blocked (`stop_signals_blocked` around the loader's
    iterator): torch installs its own SIGTERM handler in a new worker before this runs, and a
    signal in between would kill it. Ignoring a blocked signal discards it once unblocked."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block SIGINT and SIGTERM while DataLoader workers are forked (they inherit the mask, see
    ignore_sigint); a signal that arrives meanwhile reaches the main process when this ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
