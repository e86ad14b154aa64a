"""Training speed of BSAFusion: one step = forward + total_loss + backward + Adam, samples/s.

Every figure is a ratio to bsafuse's reference path (`bsafuse.model.reference`, the paper's
equations as written, NCHW; same weights, its own Adam), the two alternating in one process
(medians): `x_reference` is how many times faster the optimised training step is. CPU: batch 2
and 8 on 2 threads; CUDA, when present: batch 32 in fp32 and bf16 autocast, peak GPU memory.
Random weights and images.

    python benchmarks/bench_train.py                     # paper config, 256 px: the ratios
    python benchmarks/bench_train.py --config small      # the network the shipped weights use
    python benchmarks/bench_train.py --only optimised    # one path alone, for its peak memory
    python benchmarks/bench_train.py --compile           # the optimised network under torch.compile

Never run as a test.
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
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (0: torch's default)")
    parser.add_argument("--cpu-batches", default="2,8")
    parser.add_argument("--cuda-batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two paths per batch")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per path and round")
    parser.add_argument(
        "--only", choices=("optimised", "reference"), help="time one path alone (for its peak memory)"
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        metavar="MODE",
        help="torch.compile the optimised network (compile time reported; "
        "MODE e.g. max-autotune-no-cudagraphs)",
    )
    parser.add_argument("--no-tune", action="store_true", help="skip bsafuse's OMP/malloc process settings")
    parser.add_argument("--no-cpu", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    facts = setup(threads=args.threads, tune=not args.no_tune)
    import torch

    facts.update(config=args.config, size=args.size)
    rows = []
    if not args.no_cpu:
        rows += [run(args, "cpu", int(b), "fp32") for b in args.cpu_batches.split(",")]
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        for precision in ("fp32", "bf16"):
            rows.append(run(args, "cuda", args.cuda_batch, precision))
    else:
        facts["cuda"] = "not available: CUDA rows skipped"
    facts["load_average_after"] = os.getloadavg()[0]
    output(
        rows, facts, title=f"bsafuse training step, {args.config} config, {args.size} px", as_json=args.json
    )
    return 0


def run(args: argparse.Namespace, device: str, batch: int, precision: str) -> dict[str, Any]:
    """Time training steps of the optimised and the reference path, alternating; one table row."""
    import copy

    import torch

    from bsafuse.config import ModelConfig
    from bsafuse.losses import total_loss
    from bsafuse.model import BSAFusion
    from bsafuse.model.reference import ReferenceForward
    from bsafuse.training.state import adam

    torch.manual_seed(0)
    model = BSAFusion(ModelConfig.paper() if args.config == "paper" else ModelConfig.small()).to(device).train()
    reference = ReferenceForward(copy.deepcopy(model).to(memory_format=torch.contiguous_format)).train()
    optimised: Any = model
    if args.compile:
        optimised = torch.compile(model, dynamic=False, mode=args.compile)
    paths = {"optimised": optimised, "reference": reference}
    if args.only:
        paths = {args.only: paths[args.only]}
    g = torch.Generator().manual_seed(1)
    moving, fixed, label = (torch.rand(batch, 1, args.size, args.size, generator=g).to(device) for _ in range(3))
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(forward: Any, optimiser: torch.optim.Optimizer) -> None:
        with autocast:
            out = forward(moving, fixed)
            loss, _ = total_loss(out, moving=moving, fixed=fixed, label=label)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    calls = {}
    for name, forward in paths.items():
        trainable = [p for p in forward.parameters() if p.requires_grad]
        # the optimised step uses the optimiser `bsafuse train` uses (fused where torch has it);
        # the reference step torch's default Adam, as the public implementation does
        optimiser = adam(trainable, 5e-5) if name == "optimised" else torch.optim.Adam(trainable, lr=5e-5)
        calls[name] = functools.partial(step, forward, optimiser)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    compile_s = None
    if args.compile and "optimised" in calls:  # the first step compiles (forward and backward graphs)
        (compile_s,) = timed(calls["optimised"], warmup=0, reps=1, sync=sync)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = interleaved(calls, rounds=args.rounds, reps=args.steps, warmup=1, sync=sync)
    row: dict[str, Any] = {"device": device, "precision": precision, "batch": batch}
    if len(times) == 2:
        row.update(ratio_row(times, per_call=batch, unit="samples"))
    else:
        (name, values), = times.items()
        row.update(path=name, median_s=statistics.median(values), samples_per_s=batch / statistics.median(values))
    if compile_s is not None:
        row["compile_s"] = compile_s
    row["peak_gb"] = torch.cuda.max_memory_allocated() / (1 << 30) if device == "cuda" else peak_rss_gb()
    return row


if __name__ == "__main__":
    raise SystemExit(main())
