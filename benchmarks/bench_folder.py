"""Folder fusion throughput: the streaming pipeline against the network's own speed.

Builds a folder of N 256 x 256 CT/MRI pairs (copies of examples/data) and a random-weight `paper`
checkpoint in a temporary folder, then measures pairs/s of

- the network alone (tensors in, tensors out) at batch 1 and at batch 8;
- a sequential loop: read a pair, fuse it (bsafuse.api.fuse), write it, next pair;
- `bsafuse.batch.fuse_files` on the folders (what `bsafuse fuse IN_DIR FIXED_DIR -o OUT` runs): the
  next pairs are read and the finished ones written while the network computes.

and the resident memory after every 8 pairs of the streaming run (it should stay flat).

    python benchmarks/bench_folder.py [--pairs 64] [--threads 2] [--json]

Never run as a test.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, output, setup, summary, timed

EXAMPLES = REPO / "examples" / "data" / "CT-MRI"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (0: torch's default)")
    parser.add_argument("--no-tune", action="store_true", help="skip bsafuse's OMP/malloc process settings")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    facts = setup(threads=args.threads, tune=not args.no_tune)
    with tempfile.TemporaryDirectory(prefix="bsafuse-bench-") as tmp:
        root = Path(tmp)
        checkpoint = make_inputs(root, args.pairs)
        from bsafuse.api import load_model

        model = load_model(checkpoint, device="cpu")
        rows = [*network_rows(model)]
        for report in (False, True):
            rows += [sequential_row(root, model, report=report), streaming_row(root, model, report=report)]
    best = max(r["pairs_per_s"] for r in rows if r["what"].startswith("network"))
    for row in rows:
        row["of_network_b1"] = row["pairs_per_s"] / rows[0]["pairs_per_s"]
    facts.update(pairs=args.pairs, network_best_pairs_per_s=best)
    output(
        rows, facts, title=f"bsafuse folder fusion, {args.pairs} pairs of 256 x 256 PNG", as_json=args.json
    )
    return 0


def make_inputs(root: Path, count: int) -> Path:
    """N pairs named case000.png ... in root/ct and root/mri, and a paper-config checkpoint."""
    import torch

    from bsafuse.config import ModelConfig
    from bsafuse.model import BSAFusion
    from bsafuse.weights import save_checkpoint

    sources = sorted(p.name for p in (EXAMPLES / "CT").glob("*.png"))
    for kind in ("CT", "MRI"):
        (root / kind.lower()).mkdir()
        for i in range(count):
            shutil.copy(EXAMPLES / kind / sources[i % len(sources)], root / kind.lower() / f"case{i:03d}.png")
    torch.manual_seed(0)
    return save_checkpoint(root / "paper.pt", BSAFusion(ModelConfig.paper()).eval())


def network_rows(model: Any) -> list[dict[str, Any]]:
    import torch

    rows = []
    for batch, reps in ((1, 10), (8, 3)):
        moving, fixed = torch.rand(batch, 1, 256, 256), torch.rand(batch, 1, 256, 256)
        with torch.inference_mode():
            stats = summary(timed(lambda m=moving, f=fixed: model(m, f), warmup=1, reps=reps))
        rows.append({"what": f"network alone, batch {batch}", "pairs_per_s": batch / stats["median_s"]})
    return rows


def sequential_row(root: Path, model: Any, *, report: bool) -> dict[str, Any]:
    """The loop a folder run was before streaming: read, fuse, write (and report), one pair at a time."""
    from bsafuse.api import fuse
    from bsafuse.io import read_image, write_image
    from bsafuse.report import write_report

    out = root / f"out-sequential-{report}"
    start = time.perf_counter()
    pairs = sorted((root / "ct").iterdir())
    for moving_path in pairs:
        moving, fixed = read_image(moving_path), read_image(root / "mri" / moving_path.name)
        result = fuse(moving, fixed, model)
        if report:
            write_report(out / "reports" / moving_path.name, result)
        write_image(out / moving_path.name, result.fused, like=fixed)
    seconds = time.perf_counter() - start
    what = "one by one: read, fuse, write" + (", report" if report else "")
    return {"what": what, "pairs_per_s": len(pairs) / seconds, "seconds": seconds}


def streaming_row(root: Path, model: Any, *, report: bool) -> dict[str, Any]:
    from bsafuse.batch import fuse_files

    rss: list[float] = []

    def progress(done: int, total: int, what: str) -> None:
        if done % 8 == 0:
            rss.append(current_rss_gb())

    out = root / f"out-stream-{report}"
    start = time.perf_counter()
    done = fuse_files(
        root / "ct",
        root / "mri",
        out,
        model=model,
        progress=progress,
        report=out / "reports" if report else None,
    )
    seconds = time.perf_counter() - start
    assert len(done.ok) == len(done.items), done.failed[:1]
    return {
        "what": "fuse_files, streaming" + (", --report" if report else ""),
        "pairs_per_s": len(done.items) / seconds,
        "seconds": seconds,
        "rss_gb_every_8": " ".join(f"{v:.2f}" for v in rss),
    }


def current_rss_gb() -> float:
    """Resident memory now (not the peak), from /proc; 0 where /proc is missing."""
    import os

    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 30)


if __name__ == "__main__":
    raise SystemExit(main())
