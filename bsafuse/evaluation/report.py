"""The files of a protocol run: results.csv, summary.json and one box plot per metric.

- ``results.csv``: one row per (pair, method): pair, case, method, the fusion metrics, the
  registration metrics (empty where they do not apply), seconds, error (empty when it worked).
- ``summary.json``: the run's settings (data, weights name/path/sha256, seed, deformation, methods,
  pairs), then per method and metric the mean, the standard deviation (population, ddof = 0) and
  the count of the finite values, the metric directions, and the failures.
- ``boxplot_<metric>.png``: the distribution over pairs per method, with the mean marked. Needs
  matplotlib (``pip install "bsafuse[plots]"``); without it the plots are skipped and
  :func:`write_outputs` says so in its notes.

Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bsafuse.evaluation.scoring import ROW_METRICS
from bsafuse.io.atomic import atomic_path
from bsafuse.metrics import METRICS

if TYPE_CHECKING:
    from bsafuse.evaluation.protocol import ProtocolReport

CSV_COLUMNS = ("pair", "case", "method", *ROW_METRICS, "seconds", "error")
RESULTS, SUMMARY = "results.csv", "summary.json"


def summarise(report: ProtocolReport) -> dict[str, Any]:
    """{method: {"pairs": n scored, "failed": n failed, "metrics": {key: {"mean", "std", "n"}}}}.

    Metrics a method does not produce (e.g. EPE for `average`) have mean and std None and n 0.
    """
    out: dict[str, Any] = {}
    for method in report.methods:
        rows = [r for r in report.rows if r["method"] == method]
        ok = [r for r in rows if not r["error"]]
        stats = {}
        for key in ROW_METRICS:
            values = np.array([r[key] for r in ok if r[key] is not None], dtype=np.float64)
            stats[key] = {
                "mean": float(values.mean()) if values.size else None,
                "std": float(values.std()) if values.size else None,
                "n": int(values.size),
            }
        out[method] = {"pairs": len(ok), "failed": len(rows) - len(ok), "metrics": stats}
    return out


def summary_document(report: ProtocolReport) -> dict[str, Any]:
    """The content of summary.json (also what `bsafuse evaluate --json` prints); strict JSON types."""
    return jsonable(
        {
            "settings": report.settings,
            "metrics": {
                k: {"name": METRICS[k].name, "higher_is_better": METRICS[k].higher_is_better}
                for k in ROW_METRICS
            },
            "summary": summarise(report),
            "failures": report.failures,
        }
    )


def write_outputs(
    report: ProtocolReport, out_dir: str | os.PathLike[str], *, plots: bool = True
) -> tuple[list[Path], list[str]]:
    """Write results.csv, summary.json and (if `plots`) the box plots; return (files, notes)."""
    out = Path(out_dir)
    files = [_write_csv(report, out / RESULTS), _write_text(out / SUMMARY, to_json(summary_document(report)))]
    notes: list[str] = []
    if plots:
        try:
            files += write_boxplots(report, out)
        except ImportError:
            notes.append('box plots skipped: matplotlib is not installed (pip install "bsafuse[plots]")')
    return files, notes


def to_json(document: Any) -> str:
    """JSON text with NaN and infinities written as null (strict JSON)."""
    return json.dumps(jsonable(document), indent=2) + "\n"


def jsonable(value: Any) -> Any:
    """`value` with tuples as lists and NaN or infinities as None, for strict JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_csv(report: ProtocolReport, path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        writer.writerow({k: _cell(row.get(k)) for k in CSV_COLUMNS})
    return _write_text(path, buffer.getvalue())


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else value  # shortest exact float text


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_boxplots(report: ProtocolReport, out_dir: Path) -> list[Path]:
    """One PNG per metric with data: a box per method over its pairs, the mean as a marker.

    Raises ImportError without matplotlib.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    for key in ROW_METRICS:
        series = {
            m: [r[key] for r in report.rows if r["method"] == m and not r["error"] and r[key] is not None]
            for m in report.methods
        }
        series = {m: v for m, v in series.items() if v}
        if not series:
            continue
        info = METRICS[key]
        fig = Figure(figsize=(1.3 * len(series) + 2.2, 4.2), dpi=110)  # no pyplot: no global state
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.boxplot(
            list(series.values()), showmeans=True, widths=0.55,
            meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black", "markersize": 6},
            medianprops={"color": "tab:orange", "linewidth": 1.5},
        )  # fmt: skip
        ax.set_xticks(range(1, len(series) + 1), [f"{m}\n(n={len(v)})" for m, v in series.items()])
        ax.set_xlabel("method")
        ax.set_ylabel(f"{info.name} {info.arrow}")
        better = "higher" if info.higher_is_better else "lower"
        ax.set_title(f"{info.name} over {len(report.pairs)} pairs ({better} is better)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.plot([], [], "D", markerfacecolor="white", markeredgecolor="black", label="mean")
        ax.plot([], [], "-", color="tab:orange", label="median")
        ax.legend(loc="best", fontsize=8, frameon=False)
        fig.tight_layout()
        path = out_dir / f"boxplot_{key}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        written.append(path)
    return written
