"""The test cases of the protocol: which pairs a data folder holds, and how each is made misaligned.

Two folder layouts are accepted:

- *aligned* (design.md §7, as tests/data/harvard/CT-MRI): ``MRI/`` plus one moving-modality folder
  (``CT/``, ``PET/``, ``SPECT/``) of same-named, aligned images. Each pair is misaligned by
  deforming its moving image with ``deform.random_deformation`` (default ``DeformParams``, whose
  pixel amplitudes are for 256-px images and scale with the image size). The generator is seeded
  from (seed, pair name) alone, so a pair gets the same deformation whatever ``--limit`` or
  ``--val-cases`` select, and every method sees the same deformed pair.
- *pre-deformed* (published test sets): ``moving/``, ``fixed/`` and ``label/`` (the moving image
  aligned to the fixed one) of same-named images, and optionally ``flow/<name>.npy``, the
  ground-truth flow (2, H, W) float32 pixels with ``warp(moving, flow) ~= label``, for EPE.

Every image is used at its own size (all three of a pair must match) as grey float32 in [0, 1]; a
colour (PET/SPECT) moving image becomes its BT.601 luma Y, the channel the network sees.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bsafuse import data as data_mod
from bsafuse.deform import DeformParams, random_deformation
from bsafuse.errors import InputError
from bsafuse.evaluation.scoring import grey
from bsafuse.pairing import images_by_stem

log = logging.getLogger(__name__)

PREDEFORMED = ("moving", "fixed", "label")  # sub-folders of a pre-deformed test set
FLOW_FOLDER = "flow"


@dataclass(frozen=True)
class PairSource:
    """Where one pair's files are. `label`/`flow` are set for pre-deformed sets only."""

    name: str
    moving: Path
    fixed: Path
    label: Path | None = None
    flow: Path | None = None

    @property
    def case(self) -> str:
        return data_mod.case_of(self.name)


@dataclass(frozen=True)
class Case:
    """One misaligned test pair: (H, W) float32 images in [0, 1] and the true flow (2, H, W) or None.

    ``warp(moving, flow_true) ~= label``; `label` is the moving image aligned to `fixed`.
    """

    name: str
    moving: np.ndarray
    fixed: np.ndarray
    label: np.ndarray
    flow_true: np.ndarray | None


def _subfolder(data_dir: Path, name: str) -> Path | None:
    found = [d for d in data_dir.iterdir() if d.is_dir() and d.name.lower() == name]
    return found[0] if found else None


def is_predeformed(data_dir: Path) -> bool:
    """True when `data_dir` holds moving/, fixed/ and label/ (any letter case)."""
    return Path(data_dir).is_dir() and all(_subfolder(Path(data_dir), n) for n in PREDEFORMED)


def find_sources(data_dir: str | Path, *, pair: str | None = None) -> tuple[str, str, list[PairSource]]:
    """(layout "aligned" | "pre-deformed", moving modality, the pairs sorted by name) of a folder."""
    data_dir = Path(data_dir)
    if is_predeformed(data_dir):
        folders = {n: _subfolder(data_dir, n) for n in (*PREDEFORMED, FLOW_FOLDER)}
        listed = {n: images_by_stem(folders[n]) for n in PREDEFORMED}  # type: ignore[arg-type]
        names = sorted(set.intersection(*(set(v) for v in listed.values())))
        lonely = sorted(set.union(*(set(v) for v in listed.values())) - set(names))
        if lonely:
            log.warning("%d image(s) are not in all of moving/, fixed/, label/ and are skipped: %s",
                        len(lonely), ", ".join(lonely[:5]))  # fmt: skip
        if not names:
            raise InputError(f"{data_dir}: moving/, fixed/ and label/ have no image names in common")
        flow_dir = folders[FLOW_FOLDER]
        sources = [
            PairSource(
                n,
                listed["moving"][n],
                listed["fixed"][n],
                listed["label"][n],
                flow_dir / f"{n}.npy" if flow_dir is not None else None,
            )
            for n in names
        ]
        return "pre-deformed", "", sources
    moving_dir, fixed_dir = data_mod.find_pair_folder(data_dir, pair)
    moving, fixed = images_by_stem(moving_dir), images_by_stem(fixed_dir)
    names = data_mod.list_pairs(moving_dir, fixed_dir)
    return "aligned", moving_dir.name, [PairSource(n, moving[n], fixed[n]) for n in names]


def select(
    sources: list[PairSource], *, val_cases: Sequence[str] | None, limit: int | None
) -> list[PairSource]:
    """The pairs of the given cases (all when None), then the first `limit` of them."""
    if val_cases is not None:
        wanted = {str(int(c)) if c.isdigit() else c for c in (c.strip() for c in val_cases) if c}
        present = sorted({s.case for s in sources}, key=lambda c: (len(c), c))
        unknown = sorted(wanted - set(present))
        if unknown:
            raise InputError(
                f"--val-cases {','.join(unknown)}: no such case in the data (cases: {', '.join(present)})"
            )
        sources = [s for s in sources if s.case in wanted]
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit must be at least 1, got {limit}")
        sources = sources[:limit]
    if not sources:
        raise InputError("no pairs to evaluate (check --val-cases and --limit)")
    return sources


def pair_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, pair name) alone."""
    state = np.random.SeedSequence([seed, zlib.crc32(name.encode("utf-8"))]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _read(path: Path, *, role: str) -> np.ndarray:
    from bsafuse.io import read_image

    image = read_image(path)
    if role == "fixed" and image.is_colour:
        raise InputError(f"{path} is a colour image; the fixed image (MRI) must be grey")
    return grey(image.pixels, name=str(path)).astype(np.float32)


def _read_flow(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    if not path.is_file():
        log.warning("%s is missing: no end-point error for this pair", path)
        return None
    try:
        flow = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable .npy flow ({exc})") from None
    flow = np.asarray(flow, dtype=np.float32)
    flow = flow[0] if flow.ndim == 4 and flow.shape[0] == 1 else flow
    if flow.shape != (2, *shape) or not np.isfinite(flow).all():
        raise InputError(
            f"{path} has shape {flow.shape}; expected a finite (2, {shape[0]}, {shape[1]}) flow in pixels "
            "(channel 0 = x) with warp(moving, flow) ~= label"
        )
    return flow


def load_case(source: PairSource, *, seed: int, params: DeformParams) -> Case:
    """Read one pair and, for an aligned pair, deform its moving image (the label) with its own seed."""
    fixed = _read(source.fixed, role="fixed")
    if source.label is not None:  # pre-deformed set
        moving, label = _read(source.moving, role="moving"), _read(source.label, role="label")
        _same_size(source, fixed, moving=moving, label=label)
        flow = _read_flow(source.flow, fixed.shape) if source.flow is not None else None
        return Case(source.name, moving, fixed, label, flow)
    label = _read(source.moving, role="moving")
    _same_size(source, fixed, moving=label)
    scaled = data_mod.scaled_deform(params, max(label.shape))
    deformed, flow_true = random_deformation(
        torch.from_numpy(label)[None, None], params=scaled, generator=pair_generator(seed, source.name)
    )
    moving = deformed[0, 0].clamp(0, 1).numpy()
    return Case(source.name, moving, fixed, label, flow_true[0].numpy())


def _same_size(source: PairSource, fixed: np.ndarray, **others: np.ndarray) -> None:
    for role, image in others.items():
        if image.shape != fixed.shape:
            raise InputError(
                f"pair {source.name!r}: the {role} image is {image.shape[0]}x{image.shape[1]} but the fixed image "
                f"{source.fixed.name} is {fixed.shape[0]}x{fixed.shape[1]}; test pairs must have the same size"
            )
