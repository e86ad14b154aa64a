"""Inference speed of BSAFusion on 256 x 256 pairs: latency, throughput, peak memory, FLOPs.

CPU (2 threads by default): latency at batch 1 (median of >= 10 after warm-up), throughput at
batch 8 and 32 (pairs/s), peak resident memory. CUDA, when present: fp32 and bf16 autocast at
batch 1, 32 and 128, peak GPU memory, and pairs/s per TFLOP/s of the card (its dense GEMM rate in
that precision, measured here). Random weights: speed does not depend on them.

    python benchmarks/bench_fuse.py                   # the optimised path (the default)
    python benchmarks/bench_fuse.py --reference       # optimisations off: the plain transcription
    python benchmarks/bench_fuse.py --json > fuse.json

Peak RSS is the process's high-water mark so far: rows run in increasing batch order, so each
row's value is that batch's peak (plus what the earlier, smaller ones left). Never run as a test.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from typing import Any

from _common import PUBLIC, output, peak_rss_gb, setup, summary, timed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("paper", "small"), default="paper")
    parser.add_argument("--size", type=int, default=256, help="square input side, pixels")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (0: torch's default)")
    parser.add_argument("--reps", type=int, default=10, help="timed runs at batch 1 (fewer for big batches)")
    parser.add_argument("--cpu-batches", default="1,8,32")
    parser.add_argument("--cuda-batches", default="1,32,128")
    parser.add_argument("--reference", action="store_true", help="switch every optimisation off")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (experimental)")
    parser.add_argument("--no-tune", action="store_true", help="skip bsafuse's OMP/malloc process settings")
    parser.add_argument("--no-cpu", action="store_true", help="CUDA rows only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    facts = setup(threads=args.threads, tune=not args.no_tune)
    import torch

    model, context = build(args.config, reference=args.reference)
    facts.update(config=args.config, path="reference" if args.reference else "optimised")
    facts.update(params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2))
    facts.update(gflops_per_pair=gflops(model, args.size, context))
    runner: Any = torch.compile(model) if args.compile else model
    rows: list[dict[str, Any]] = []
    if not args.no_cpu:
        rows += cpu_rows(runner, args, context)
    if torch.cuda.is_available():
        rows += cuda_rows(model, args, context)
    else:
        facts["cuda"] = "not available: CUDA rows skipped"
    output(rows, facts, title=f"bsafuse fuse, {args.config} config, {args.size} px", as_json=args.json)
    return 0


def build(
    config: str, *, reference: bool
) -> tuple[Any, Callable[[], contextlib.AbstractContextManager[None]]]:
    """A seeded eval-mode model and the context its forward passes run in."""
    import torch

    from bsafuse.config import ModelConfig
    from bsafuse.model import BSAFusion
    from bsafuse.model.reference import ReferenceForward

    torch.manual_seed(0)
    model = BSAFusion(ModelConfig.paper() if config == "paper" else ModelConfig.small()).eval()
    if reference:  # the paper's equations as written (bsafuse.model.reference), NCHW layout
        return ReferenceForward(model.to(memory_format=torch.contiguous_format)), contextlib.nullcontext
    return model, contextlib.nullcontext


def pair(batch: int, size: int, device: Any = "cpu") -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(batch)
    moving, fixed = (torch.rand(batch, 1, size, size, generator=g).to(device) for _ in range(2))
    return moving, fixed


def gflops(model: Any, size: int, context: Callable[[], Any]) -> float:
    """Floating-point operations of one pair's forward pass, as executed (multiply-add = 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    moving, fixed = pair(1, size)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), context(), counter:
        model(moving, fixed)
    return round(counter.get_total_flops() / 1e9, 2)


def cpu_rows(model: Any, args: argparse.Namespace, context: Callable[[], Any]) -> list[dict[str, Any]]:
    import torch

    rows = []
    for batch in (int(b) for b in args.cpu_batches.split(",")):
        moving, fixed = pair(batch, args.size)
        reps = args.reps if batch == 1 else max(2, args.reps // (3 if batch <= 8 else 5))
        with torch.inference_mode(), context():
            times = timed(lambda m=moving, f=fixed: model(m, f), warmup=2 if batch == 1 else 1, reps=reps)
        stats = summary(times)
        row = {
            "device": "cpu",
            "precision": "fp32",
            "batch": batch,
            **_rates(stats, batch),
            "peak_gb": peak_rss_gb(),
        }
        if args.config == "paper" and args.size == 256 and args.threads == 2:
            if batch == 1:
                row["x_public"] = PUBLIC["latency_b1_s"] / stats["median_s"]
            elif batch == 8:
                row["x_public"] = row["pairs_per_s"] / PUBLIC["pairs_per_s_b8"]
        rows.append(row)
        del moving, fixed
    return rows


def cuda_rows(model: Any, args: argparse.Namespace, context: Callable[[], Any]) -> list[dict[str, Any]]:
    import torch

    torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    model = model.cuda()
    runner: Any = torch.compile(model) if args.compile else model
    rows = []
    for precision in ("fp32", "bf16"):
        tflops = gemm_tflops(torch.float32 if precision == "fp32" else torch.bfloat16)
        for batch in (int(b) for b in args.cuda_batches.split(",")):
            row: dict[str, Any] = {"device": "cuda", "precision": precision, "batch": batch}
            try:
                row.update(_cuda_run(runner, batch, args, context, precision))
            except torch.cuda.OutOfMemoryError:
                row["pairs_per_s"] = "out of memory"
                rows.append(row)
                torch.cuda.empty_cache()
                continue
            row["pairs_per_s_per_tflops"] = row["pairs_per_s"] / tflops
            row["gemm_tflops"] = tflops
            rows.append(row)
    return rows


def _cuda_run(
    model: Any, batch: int, args: argparse.Namespace, context: Callable[[], Any], precision: str
) -> dict[str, Any]:
    import torch

    moving, fixed = pair(batch, args.size, "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), context(), autocast:
        reps = args.reps if batch == 1 else 5
        times = timed(lambda: model(moving, fixed), warmup=3, reps=reps, sync=torch.cuda.synchronize)
    return {**_rates(summary(times), batch), "peak_gb": torch.cuda.max_memory_allocated() / (1 << 30)}


def gemm_tflops(dtype: Any, n: int = 8192) -> float:
    """The card's dense matrix-multiply rate in `dtype`, TFLOP/s (the denominator of pairs/s/TFLOP)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    times = timed(lambda: a @ b, warmup=3, reps=10, sync=torch.cuda.synchronize)
    return 2 * n**3 / min(times) / 1e12


def _rates(stats: dict[str, float], batch: int) -> dict[str, Any]:
    return {
        "median_s": stats["median_s"],
        "min_s": stats["min_s"],
        "s_per_pair": stats["median_s"] / batch,
        "pairs_per_s": batch / stats["median_s"],
        "reps": int(stats["reps"]),
    }


if __name__ == "__main__":
    raise SystemExit(main())
