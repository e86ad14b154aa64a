"""Inference speed of BSAFusion on 256 x 256 pairs: latency, throughput, peak memory, FLOPs.

Every figure is a ratio to bsafuse's reference path (`bsafuse.model.reference`: the paper's
equations as written, NCHW), measured in the same process with the same weights, the two paths
alternating (A, B, A, B ...; medians): `x_reference` is how many times faster the optimised
network is. Absolute times are "on this machine, this day" only. CPU (2 threads by default): batch
1 and 8. CUDA, when present: fp32 and bf16 autocast at batch 1, 32 and 128, peak GPU memory, and
pairs/s per TFLOP/s of the card (its dense GEMM rate in that precision, measured here). Random
weights: speed does not depend on them.

    python benchmarks/bench_fuse.py                     # paper config, 256 px: the ratios
    python benchmarks/bench_fuse.py --config small      # the network the shipped weights use
    python benchmarks/bench_fuse.py --only optimised    # one path alone, for its peak memory
    python benchmarks/bench_fuse.py --json > fuse.json

Peak RSS is the process's high-water mark so far (both paths, unless --only). Never run as a test.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
from typing import Any

from _common import interleaved, output, peak_rss_gb, ratio_row, setup, timed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("paper", "small"), default="paper")
    parser.add_argument("--size", type=int, default=256, help="square input side, pixels")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the two paths per batch")
    parser.add_argument("--reps", type=int, default=4, help="timed calls per path and round at batch 1")
    parser.add_argument("--cpu-batches", default="1,8")
    parser.add_argument("--cuda-batches", default="1,32,128")
    parser.add_argument(
        "--only", choices=("optimised", "reference"), help="time one path alone (for its peak memory)"
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        metavar="MODE",
        help="torch.compile the optimised path (dynamic=False; MODE e.g. max-autotune-no-cudagraphs)",
    )
    parser.add_argument(
        "--transfer-scores",
        action="store_true",
        help="also run the frozen modality classifier (L_ce2's input; `bsafuse fuse` skips it)",
    )
    parser.add_argument("--no-tune", action="store_true", help="skip bsafuse's OMP/malloc process settings")
    parser.add_argument("--no-cpu", action="store_true", help="CUDA rows only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    facts = setup(threads=args.threads, tune=not args.no_tune)
    import torch

    paths = build(args.config, compile_model=args.compile, transfer_scores=args.transfer_scores)
    facts["transfer_scores"] = args.transfer_scores
    if args.only:
        paths = {args.only: paths[args.only]}
    model = paths.get("optimised", paths.get("reference"))
    facts.update(config=args.config, size=args.size)
    facts.update(params=sum(p.numel() for p in model.parameters()))
    # Counted on the eager module: a compiled one would be traced under the counter's dispatch mode.
    eager = {name: getattr(fn, "_orig_mod", fn) for name, fn in paths.items()}
    facts.update(gflops_per_pair={name: gflops(fn, args.size) for name, fn in eager.items()})
    rows: list[dict[str, Any]] = []
    if not args.no_cpu:
        rows += cpu_rows(paths, args)
    if torch.cuda.is_available():
        rows += cuda_rows(paths, args)
    else:
        facts["cuda"] = "not available: CUDA rows skipped"
    facts["load_average_after"] = os.getloadavg()[0]
    output(rows, facts, title=f"bsafuse fuse, {args.config} config, {args.size} px", as_json=args.json)
    return 0


def build(config: str, *, compile_model: str | None = None, transfer_scores: bool = False) -> dict[str, Any]:
    """The optimised model as `bsafuse fuse` runs it (without the frozen classifier's scores,
    which only the training loss reads, unless `transfer_scores`) and bsafuse's reference path
    (the paper's equations as written, NCHW, every output), with the same seeded weights."""
    import copy

    import torch

    from bsafuse.config import ModelConfig
    from bsafuse.model import BSAFusion
    from bsafuse.model.reference import ReferenceForward

    class Inference(torch.nn.Module):
        def __init__(self, net: BSAFusion) -> None:
            super().__init__()
            self.net = net

        def forward(self, moving: Any, fixed: Any) -> Any:
            return self.net(moving, fixed, transfer_scores=transfer_scores)

    torch.manual_seed(0)
    model = BSAFusion(ModelConfig.paper() if config == "paper" else ModelConfig.small()).eval()
    reference = ReferenceForward(copy.deepcopy(model).to(memory_format=torch.contiguous_format)).eval()
    optimised: Any = Inference(model).eval()
    if compile_model:
        optimised = torch.compile(optimised, dynamic=False, mode=compile_model)
    return {"optimised": optimised, "reference": reference}


def pair(batch: int, size: int, device: Any = "cpu") -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(batch)
    moving, fixed = (torch.rand(batch, 1, size, size, generator=g).to(device) for _ in range(2))
    return moving, fixed


def gflops(model: Any, size: int) -> float:
    """Floating-point operations of one pair's forward pass, as executed (multiply-add = 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    moving, fixed = pair(1, size)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(moving, fixed)
    return round(counter.get_total_flops() / 1e9, 2)


def cpu_rows(paths: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    rows = []
    for batch in (int(b) for b in args.cpu_batches.split(",")):
        moving, fixed = pair(batch, args.size)
        reps = args.reps if batch == 1 else max(1, args.reps // 4)
        with torch.inference_mode():
            times = interleaved(_calls(paths, moving, fixed), rounds=args.rounds, reps=reps)
        row: dict[str, Any] = {"device": "cpu", "precision": "fp32", "batch": batch}
        row.update(_row(times, batch))
        row["peak_gb"] = peak_rss_gb()
        rows.append(row)
        del moving, fixed
    return rows


def cuda_rows(paths: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    paths = {name: fn.cuda() for name, fn in paths.items()}
    rows = []
    for precision in ("fp32", "bf16"):
        tflops = gemm_tflops(torch.float32 if precision == "fp32" else torch.bfloat16)
        for batch in (int(b) for b in args.cuda_batches.split(",")):
            row: dict[str, Any] = {"device": "cuda", "precision": precision, "batch": batch}
            try:
                row.update(_cuda_run(paths, batch, args, precision))
            except torch.cuda.OutOfMemoryError:
                row["pairs_per_s"] = "out of memory"
                rows.append(row)
                torch.cuda.empty_cache()
                continue
            row["pairs_per_s_per_tflops"] = row["pairs_per_s"] / tflops
            row["gemm_tflops"] = tflops
            rows.append(row)
    return rows


def _cuda_run(paths: dict[str, Any], batch: int, args: argparse.Namespace, precision: str) -> dict[str, Any]:
    import torch

    moving, fixed = pair(batch, args.size, "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), autocast:
        times = interleaved(
            _calls(paths, moving, fixed), rounds=args.rounds, reps=args.reps, warmup=3, sync=torch.cuda.synchronize
        )
    return {**_row(times, batch), "peak_gb": torch.cuda.max_memory_allocated() / (1 << 30)}


def _calls(paths: dict[str, Any], moving: Any, fixed: Any) -> dict[str, Any]:
    """Each path's forward pass on this batch, as a call without arguments."""
    return {name: functools.partial(fn, moving, fixed) for name, fn in paths.items()}


def _row(times: dict[str, list[float]], batch: int) -> dict[str, Any]:
    """The ratio row when both paths ran, else the one path's median and rate."""
    if len(times) == 2:
        return ratio_row(times, per_call=batch, unit="pairs")
    (name, values), = times.items()
    median = statistics.median(values)
    return {"path": name, "median_s": median, "pairs_per_s": batch / median, "calls": len(values)}


def gemm_tflops(dtype: Any, n: int = 8192) -> float:
    """The card's dense matrix-multiply rate in `dtype`, TFLOP/s (the denominator of pairs/s/TFLOP)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    times = timed(lambda: a @ b, warmup=3, reps=10, sync=torch.cuda.synchronize)
    return 2 * n**3 / min(times) / 1e12


if __name__ == "__main__":
    raise SystemExit(main())
