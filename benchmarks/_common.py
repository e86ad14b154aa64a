"""Shared plumbing of the benchmark scripts: process setup, machine facts, timing, tables.

`setup()` must run before torch is imported (OMP_WAIT_POLICY is read when torch loads), so the
scripts import torch only inside their functions.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/bench_x.py` without installing
    sys.path.insert(0, str(REPO))



def setup(*, threads: int | None, tune: bool) -> dict[str, Any]:
    """Apply bsafuse's process settings (unless `tune` is off), as the command line does, and the thread count."""
    from bsafuse._runtime import tune_process

    applied = tune_process() if tune else {"omp_wait_policy": None, "malloc": False}
    import torch

    if threads:
        torch.set_num_threads(threads)
    return {"tuning": applied, **machine()}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def timed(
    fn: Callable[[], object], *, warmup: int, reps: int, sync: Callable[[], None] = lambda: None
) -> list[float]:
    """Wall-clock seconds of `reps` calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def interleaved(
    paths: dict[str, Callable[[], object]],
    *,
    rounds: int,
    reps: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Seconds per call of each path, measured in alternation: A, B, A, B ... (`rounds` rounds of
    `reps` calls each, after `warmup` untimed calls of every path).

    Paths timed side by side in one process see the same machine: the load of the moment, the CPU's
    clock and the allocator's state drift alike for both, so their ratio is stable where absolute
    times drift 10-30 % between runs.
    """
    for fn in paths.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            times[name] += timed(fn, warmup=0, reps=reps, sync=sync)
    return times


def ratio_row(times: dict[str, list[float]], *, per_call: int, unit: str) -> dict[str, Any]:
    """Medians of the optimised and the reference path, their ratio, and the optimised rate."""
    fast, slow = statistics.median(times["optimised"]), statistics.median(times["reference"])
    return {
        "optimised_s": fast,
        "reference_s": slow,
        "x_reference": slow / fast,
        f"{unit}_per_s": per_call / fast,
        "calls": len(times["optimised"]),
    }


def summary(times: Sequence[float]) -> dict[str, float]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "reps": len(times),
    }


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 30) if sys.platform == "darwin" else peak / (1 << 20)


def output(rows: list[dict[str, Any]], facts: dict[str, Any], *, title: str, as_json: bool) -> None:
    """A table on stdout (or one JSON document with --json)."""
    if as_json:
        print(json.dumps({"machine": facts, "results": rows}, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    for column in columns:
        table.add_column(column, justify="left" if column in ("what", "device", "path", "variant") else "right")
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console = Console(width=200)  # no truncated columns when piped
    console.print(table)
    console.print(", ".join(f"{k}: {v}" for k, v in facts.items()), soft_wrap=True)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)
