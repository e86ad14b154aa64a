"""Training speed of BSAFusion: one step = forward + total_loss + backward + Adam, samples/s.

CPU: batch 2 on 2 threads (the project's reference setting); CUDA, when present: batch 32 in
fp32 and in bf16 autocast, with peak GPU memory. Random weights and images.

    python benchmarks/bench_train.py               # the optimised path
    python benchmarks/bench_train.py --reference   # optimisations off: the plain transcription

Never run as a test.
"""

from __future__ import annotations

import argparse
from typing import Any

from _common import PUBLIC, output, peak_rss_gb, setup, summary, timed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("paper", "small"), default="paper")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (0: torch's default)")
    parser.add_argument("--cpu-batch", type=int, default=2)
    parser.add_argument("--cuda-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps")
    parser.add_argument("--reference", action="store_true", help="switch every optimisation off")
    parser.add_argument("--no-tune", action="store_true", help="skip bsafuse's OMP/malloc process settings")
    parser.add_argument("--no-cpu", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    facts = setup(threads=args.threads, tune=not args.no_tune, training=True)
    import torch

    facts.update(config=args.config, path="reference" if args.reference else "optimised")
    rows = []
    if not args.no_cpu:
        rows.append(run(args, "cpu", args.cpu_batch, "fp32"))
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        for precision in ("fp32", "bf16"):
            rows.append(run(args, "cuda", args.cuda_batch, precision))
    else:
        facts["cuda"] = "not available: CUDA rows skipped"
    output(
        rows, facts, title=f"bsafuse training step, {args.config} config, {args.size} px", as_json=args.json
    )
    return 0


def run(args: argparse.Namespace, device: str, batch: int, precision: str) -> dict[str, Any]:
    """Time training steps of a fresh model on `device`; one table row."""
    import torch

    from bsafuse.config import ModelConfig
    from bsafuse.losses import total_loss
    from bsafuse.model import BSAFusion
    from bsafuse.model.reference import ReferenceForward

    torch.manual_seed(0)
    model = (
        BSAFusion(ModelConfig.paper() if args.config == "paper" else ModelConfig.small()).to(device).train()
    )
    forward: Any = model
    if args.reference:  # the paper's equations as written (bsafuse.model.reference), NCHW layout
        forward = ReferenceForward(model.to(memory_format=torch.contiguous_format))
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    g = torch.Generator().manual_seed(1)
    moving, fixed, label = (
        torch.rand(batch, 1, args.size, args.size, generator=g).to(device) for _ in range(3)
    )
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with autocast:
            out = forward(moving, fixed)
            loss, _ = total_loss(out, moving=moving, fixed=fixed, label=label)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stats = summary(timed(step, warmup=2, reps=args.steps, sync=sync))
    row: dict[str, Any] = {
        "device": device,
        "precision": precision,
        "batch": batch,
        "median_s_per_step": stats["median_s"],
        "min_s": stats["min_s"],
        "samples_per_s": batch / stats["median_s"],
        "steps": int(stats["reps"]),
        "peak_gb": torch.cuda.max_memory_allocated() / (1 << 30) if device == "cuda" else peak_rss_gb(),
    }
    if device == "cpu" and batch == 2 and args.config == "paper" and args.size == 256 and args.threads == 2:
        row["x_public"] = PUBLIC["train_step_b2_s"] / stats["median_s"]
    return row


if __name__ == "__main__":
    raise SystemExit(main())
