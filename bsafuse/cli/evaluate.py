"""`bsafuse evaluate`: the fusion metrics of given images, or the paper's protocol on a data folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bsafuse.cli._common import err, fail, flag, handle_errors, print_json
from bsafuse.cli.deform import Elastic, Rotate, Scale, Translate
from bsafuse.cli.fuse import Device, PrecisionChoice
from bsafuse.evaluation.catalogue import DEFAULT_METHODS, METHODS

SHORT = "Score fused images, or run the evaluation protocol on a data folder."
HELP = "\n\n".join(
    (
        "Score fusion (and registration) quality with the paper's metrics.",
        "[bold]Images:[/] `bsafuse evaluate --fused F --moving A --fixed B` prints Q_AB/F, Q_CV (lower is "
        "better), Q_VIF, Q_S and Q_SSIM of F against A and B, scored as 8-bit grey images (colour -> Y) as "
        "the paper does. A should be the [bold]ground-truth-aligned[/] moving image (the label), not the "
        "misaligned input: that is how the paper's tables are computed.",
        "[bold]Protocol:[/] `bsafuse evaluate DATA_DIR --weights W -o OUT_DIR` deforms every aligned pair of "
        "DATA_DIR (MRI/ + CT/, PET/ or SPECT/) with a seed of its own, runs each method on the same deformed "
        "pair, and writes results.csv (one row per pair and method), summary.json (mean and std per method, "
        "and the run's settings) and a box plot per metric (needs matplotlib). DATA_DIR may instead be a "
        "pre-deformed test set: moving/, fixed/, label/ and optionally flow/ (.npy ground-truth flows).",
        "Deformations: --rotate, --translate, --scale and --elastic bound the random misalignment "
        "(defaults as `bsafuse deform`); e.g. --rotate 0 --translate 2 --scale 0 --elastic 2 for small motion.",
        "Methods: " + "; ".join(f"{name}: {what}" for name, what in METHODS.items())
        + ". A failed pair is reported and the rest still run (exit 1 at the end).",
    )
)  # one line per paragraph: Rich keeps line breaks


@handle_errors
def evaluate(
    data_dir: Annotated[Path | None, typer.Argument(metavar="DATA_DIR", help="Protocol: a data folder or a pre-deformed test set.", show_default=False)] = None,
    fused: Annotated[Path | None, typer.Option("--fused", help="Images: the fused image F.", show_default=False)] = None,
    moving: Annotated[Path | None, typer.Option("--moving", help="Images: A, the ground-truth-ALIGNED moving image.", show_default=False)] = None,
    fixed: Annotated[Path | None, typer.Option("--fixed", help="Images: B, the fixed MRI.", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Protocol: folder for the results.", show_default=False)] = None,
    weights: Annotated[str, typer.Option("--weights", help="auto (from the modality folder), a registry name or a .pt file.")] = "auto",
    methods: Annotated[str, typer.Option("--methods", help=f"Comma-separated, from: {','.join(METHODS)}.")] = ",".join(DEFAULT_METHODS),
    rotate: Rotate = 10.0,
    translate: Translate = 10.0,
    scale: Scale = 0.05,
    elastic: Elastic = 4.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the deformations (one per pair, from the seed and its name).")] = 0,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N pairs (sorted by name).", show_default=False)] = None,
    val_cases: Annotated[str | None, typer.Option("--val-cases", help="Only these cases, e.g. 16,20; auto: the checkpoint's validation cases.", show_default=False)] = None,
    pair: Annotated[str | None, typer.Option("--pair", help="Pick a pair folder (ct-mri, ...) of a folder holding several.", show_default=False)] = None,
    device: Device = "auto",
    precision: Annotated[PrecisionChoice, typer.Option("--precision", help="bf16 autocast runs on CUDA only.")] = "fp32",
    save_images: Annotated[bool, flag("--save-images", help="Protocol: also write the deformed pairs and every fused image.")] = False,
    json: Annotated[bool, flag("--json", help="Print the results as JSON on stdout.")] = False,
) -> None:  # fmt: skip
    """Score fused images, or run the evaluation protocol on DATA_DIR."""
    image_mode = any(x is not None for x in (fused, moving, fixed))
    if image_mode == (data_dir is not None):
        both = "not both" if image_mode else "see --help"
        raise typer.BadParameter(
            f"give DATA_DIR (protocol) or --fused, --moving and --fixed (images), {both}"
        )
    if image_mode:
        if fused is None or moving is None or fixed is None:
            raise typer.BadParameter("image mode needs all three of --fused, --moving and --fixed")
        _score_images(fused, moving, fixed, json=json)
        return
    assert data_dir is not None
    if output is None:
        raise typer.BadParameter("protocol mode needs -o OUT_DIR for results.csv, summary.json and the plots")
    cases = None if val_cases is None else ("auto" if val_cases.strip() == "auto" else val_cases.split(","))
    from bsafuse.deform import DeformParams

    params = DeformParams(rotate_deg=rotate, translate_px=translate, scale=scale, elastic_px=elastic)
    options = dict(weights=weights, methods=methods.split(","), seed=seed, limit=limit, val_cases=cases, pair=pair,
                   device=device, precision=precision, params=params,
                   save_images=output if save_images else None)  # fmt: skip
    _run_protocol(data_dir, output, json=json, **options)


def _score_images(fused: Path, moving: Path, fixed: Path, *, json: bool) -> None:
    from bsafuse.evaluation.report import jsonable
    from bsafuse.evaluation.scoring import score_files
    from bsafuse.metrics import METRICS

    scores = score_files(fused, moving, fixed)
    if json:
        print_json(
            jsonable({"fused": str(fused), "moving": str(moving), "fixed": str(fixed), "metrics": scores})
        )
    table = Table(title=f"{fused.name} vs {moving.name} (A) and {fixed.name} (B)", title_justify="left")
    for column in ("metric", "value", "better", "what it measures"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for key, value in scores.items():
        info = METRICS[key]
        table.add_row(
            info.name,
            f"{value:.4f}",
            f"{info.arrow} {'higher' if info.higher_is_better else 'lower'}",
            info.description,
        )
    err.print(table)


def _run_protocol(data_dir: Path, output: Path, *, json: bool, **options: Any) -> None:
    if not data_dir.is_dir():
        fail(f"{data_dir}: no such folder")
    from bsafuse.evaluation import run_protocol, write_outputs  # torch is loaded here, not at --help
    from bsafuse.evaluation.report import summary_document

    with Progress(
        TextColumn("evaluate {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    ) as bar:  # fmt: skip
        task = bar.add_task("pairs", total=None)

        def step(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=f"pairs (last: {name})")

        report = run_protocol(data_dir, progress=step, **options)
    files, notes = write_outputs(report, output)
    document = summary_document(report)
    if json:
        print_json(document)
    err.print(_summary_table(document))
    for note in notes:
        err.print(f"[yellow]warning:[/] {note}")
    err.print(
        f"wrote {', '.join(f.name for f in files)} to {output} (weights: {_weights_label(report.settings)})"
    )
    if report.failures:
        table = Table(title="failures", title_justify="left")
        for column in ("pair", "method", "reason"):
            table.add_column(column, overflow="fold")
        for f in report.failures:
            table.add_row(f["pair"], f["method"] or "(all)", f["error"])
        err.print(table)
        fail(f"{len(report.failed_pairs)} of {len(report.pairs)} pairs had failures")


def _summary_table(document: dict[str, Any]) -> Table:
    """Metrics as rows, methods as columns (mean ± std over the pairs); the best mean in bold."""
    metrics, summary = document["metrics"], document["summary"]
    table = Table(title=f"{len(document['settings']['pairs'])} pairs, mean ± std", title_justify="left")
    table.add_column("metric")
    for method, s in summary.items():
        table.add_column(
            method + (f" [red]({s['failed']} failed)[/]" if s["failed"] else ""), justify="right"
        )
    for key, info in metrics.items():
        stats = [s["metrics"][key] for s in summary.values()]
        means = [m["mean"] for m in stats if m["mean"] is not None]
        if not means:
            continue
        best = (max if info["higher_is_better"] else min)(means)
        cells = []
        for m in stats:
            text = "—" if m["mean"] is None else f"{m['mean']:.4g} ± {m['std']:.2g}"
            cells.append(
                f"[bold]{text}[/]" if m["mean"] is not None and m["mean"] == best and len(means) > 1 else text
            )
        table.add_row(f"{info['name']} {'↑' if info['higher_is_better'] else '↓'}", *cells)
    return table


def _weights_label(settings: dict[str, Any]) -> str:
    info = settings.get("weights") or {}
    sha = info.get("sha256")
    return f"{info.get('name', 'none')}" + (f", sha256 {sha[:12]}…" if sha else "") if info else "none"
