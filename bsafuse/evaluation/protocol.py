"""The evaluation protocol: every method on every (deformed) pair of a data folder, scored (design.md §6).

```python
from bsafuse.evaluation import run_protocol, write_outputs
report = run_protocol("data/CT-MRI", weights="path/to/best.pt", seed=0, limit=20)
write_outputs(report, "eval/")        # results.csv, summary.json, box plots
```

A pair that cannot be read, or a method that fails on a pair, is recorded (a row with its error, and
an entry in `failures`) and the run goes on; problems that stop the whole run (no data, no weights)
raise. See cases.py for the folder layouts and deformations, methods.py for the methods and
scoring.py for the scoring convention.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from bsafuse import data as data_mod
from bsafuse._version import __version__
from bsafuse.deform import DeformParams
from bsafuse.errors import BsafuseError, WeightsError
from bsafuse.evaluation.cases import Case, PairSource, find_sources, load_case, select
from bsafuse.evaluation.methods import DEFAULT_METHODS, MethodResult, MethodRunner, check_methods, needs_model
from bsafuse.evaluation.scoring import ROW_METRICS, fusion_scores, registration_scores
from bsafuse.loading import Provenance, load_model, provenance_of

if TYPE_CHECKING:
    from bsafuse.device import Precision
    from bsafuse.model import BSAFusion

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # (pairs done, pairs in all, name of the last pair)
SCORING = (
    "fusion metrics of F against (label = ground-truth-aligned moving image, fixed MRI) on 8-bit grey "
    "images (colour -> BT.601 Y); EPE against the ground-truth flow over all pixels; NCC and SSIM of "
    "the warped moving image against the label; folding = % of pixels with Jacobian determinant <= 0"
)


@dataclass
class ProtocolReport:
    """The outcome of a protocol run: one row per (pair, method), failures, and the run's settings."""

    methods: tuple[str, ...]
    settings: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)  # {"pair", "method" or None, "error"}

    @property
    def pairs(self) -> list[str]:
        return list(dict.fromkeys(row["pair"] for row in self.rows))

    @property
    def failed_pairs(self) -> list[str]:
        return list(dict.fromkeys(f["pair"] for f in self.failures))


def run_protocol(
    data_dir: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] = "auto",
    model: BSAFusion | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    seed: int = 0,
    limit: int | None = None,
    val_cases: Sequence[str] | Literal["auto"] | None = None,
    pair: str | None = None,
    device: str = "auto",
    precision: Precision = "fp32",
    params: DeformParams | None = None,
    save_images: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> ProtocolReport:
    """Deform (or read) every pair of `data_dir`, run `methods` on it and score them.

    Args:
        data_dir: an aligned data folder (MRI/ + CT/, PET/ or SPECT/; `pair` picks one of several
            pair folders) or a pre-deformed test set (moving/, fixed/, label/, optional flow/).
        weights: registry name, checkpoint path, or "auto" (from the moving folder's modality:
            CT -> ct-mri, PET -> pet-mri, SPECT -> spect-mri). Ignored when `model` is given.
        methods: names from methods.METHODS.
        seed: seed of the deformations (each pair's generator is seeded from (seed, its name)).
        limit: evaluate only the first `limit` pairs (sorted by name) of the selection.
        val_cases: evaluate only these cases; "auto" takes the validation cases of the checkpoint's
            training run (its `train` config: --val-cases, or the split drawn with its seed).
        params: deformation amplitudes (default DeformParams(), no flips or 90-degree turns).
        save_images: folder for the inputs (a pre-deformed set: moving/, fixed/, label/, flow/) and
            every method's fused image (fused/<method>/), as 8-bit PNGs.
        progress: called after each pair with (done, total, pair name).
    """
    names = check_methods(methods)
    params = params or DeformParams()
    layout, modality, sources = find_sources(Path(data_dir), pair=pair)
    if model is None and (needs_model(names) or val_cases == "auto"):
        model = load_model(weights, device, moving=sources[0].moving, modality=modality or None)
    provenance = provenance_of(model) if model is not None else None
    if val_cases == "auto":
        val_cases = _training_val_cases(provenance, [s.name for s in sources])
    sources = select(sources, val_cases=val_cases, limit=limit)
    settings = _settings(data_dir, layout, modality, names, seed, params, provenance, model, precision)
    settings.update(val_cases=list(val_cases) if val_cases is not None else None, limit=limit,
                    pairs=[s.name for s in sources])  # fmt: skip
    report = ProtocolReport(names, settings=settings)
    runner = MethodRunner(model, precision=precision)
    out = Path(save_images) if save_images is not None else None
    for done, source in enumerate(sources, start=1):
        _run_pair(report, runner, source, seed=seed, params=params, save_images=out)
        if progress is not None:
            progress(done, len(sources), source.name)
    return report


def _settings(
    data_dir: str | os.PathLike[str], layout: str, modality: str, methods: tuple[str, ...], seed: int,
    params: DeformParams, weights: Provenance | None, model: BSAFusion | None, precision: str,
) -> dict[str, Any]:  # fmt: skip
    """What summary.json records about the run (the selection is added by the caller)."""
    note = "pixel amplitudes are for 256-px images and scale with the image size"
    return {
        "bsafuse_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data_dir": str(Path(data_dir).resolve()),
        "layout": layout,
        "modality": modality or None,
        "methods": list(methods),
        "seed": seed,
        "deform": {**asdict(params), "note": note} if layout == "aligned" else None,
        "weights": weights.to_dict() if weights is not None else None,
        "device": str(next(model.parameters()).device) if model is not None else None,
        "precision": precision,
        "scoring": SCORING,
    }


def _run_pair(
    report: ProtocolReport, runner: MethodRunner, source: PairSource, *, seed: int, params: DeformParams,
    save_images: Path | None,
) -> None:  # fmt: skip
    """Score every method on one pair; failures become rows with an error and entries in `failures`."""
    try:
        case = load_case(source, seed=seed, params=params)
        if save_images is not None:
            _save_case(save_images, case)
    except BsafuseError as exc:
        report.failures.append({"pair": source.name, "method": None, "error": str(exc)})
        log.warning("pair %s failed: %s", source.name, exc)
        report.rows.extend(_row(source, m, error=str(exc)) for m in report.methods)
        return
    for method in report.methods:
        try:
            result = runner.run(method, case)
            scores = {
                **fusion_scores(result.fused, case.label, case.fixed),
                **registration_scores(
                    flow=result.flow, warped=result.warped, flow_true=case.flow_true, label=case.label
                ),
            }
            if save_images is not None:
                _save_fused(save_images, method, case, result)
        except BsafuseError as exc:
            report.failures.append({"pair": source.name, "method": method, "error": str(exc)})
            log.warning("pair %s, method %s failed: %s", source.name, method, exc)
            report.rows.append(_row(source, method, error=str(exc)))
            continue
        report.rows.append(_row(source, method, scores=scores, seconds=result.seconds))


def _row(
    source: PairSource, method: str, *, scores: dict[str, float | None] | None = None,
    seconds: float | None = None, error: str = "",
) -> dict[str, Any]:  # fmt: skip
    row: dict[str, Any] = {"pair": source.name, "case": source.case, "method": method}
    row.update({k: _finite((scores or {}).get(k)) for k in ROW_METRICS})
    row.update(seconds=seconds, error=error)
    return row


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def _training_val_cases(provenance: Provenance | None, names: list[str]) -> list[str]:
    """The validation cases of the training run that wrote the checkpoint (--val-cases auto)."""
    from bsafuse.weights import read_checkpoint

    path = provenance.path if provenance is not None else None
    train = read_checkpoint(path).get("train") if path else None
    config = train.get("config") if isinstance(train, dict) else None
    if not isinstance(config, dict):
        raise WeightsError(
            f"--val-cases auto needs a checkpoint written by `bsafuse train`; {path or 'the model'} holds no "
            "training config. Name the cases instead, e.g. --val-cases 16,20"
        )
    from bsafuse.training.config import recipe_of

    recipe = recipe_of(config)
    if recipe.val_cases:
        return [str(c) for c in recipe.val_cases]
    _, val = data_mod.split_by_case(names, val_fraction=recipe.val_fraction, seed=recipe.seed)
    if not val:
        raise WeightsError("--val-cases auto: the checkpoint's training run had no validation cases")
    return sorted({data_mod.case_of(n) for n in val}, key=lambda c: (len(c), c))


def _save_case(folder: Path, case: Case) -> None:
    from bsafuse.io import write_image
    from bsafuse.io.atomic import atomic_path

    for role in ("moving", "fixed", "label"):
        write_image(folder / "pairs" / role / f"{case.name}.png", getattr(case, role))
    if case.flow_true is not None:
        with atomic_path(folder / "pairs" / "flow" / f"{case.name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, case.flow_true.astype(np.float32))


def _save_fused(folder: Path, method: str, case: Case, result: MethodResult) -> None:
    from bsafuse.io import write_image

    write_image(folder / "fused" / method / f"{case.name}.png", result.fused)
