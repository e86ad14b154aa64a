"""Fuse every pair of two folders (files matched by name) and list the failures.

    python examples/fuse_folder.py --weights path/to/best.pt -o fused/       # the bundled CT-MRI pairs

The command-line equivalent is `bsafuse fuse MOVING_DIR FIXED_DIR -o OUT_DIR --weights W`;
pairs whose outputs exist are skipped on a second run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bsafuse import fuse_files

DATA = Path(__file__).parent / "data"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", default="auto", help="checkpoint path or registry name (default: auto)")
    parser.add_argument("--moving-dir", type=Path, default=DATA / "CT-MRI" / "CT")
    parser.add_argument("--fixed-dir", type=Path, default=DATA / "CT-MRI" / "MRI")
    parser.add_argument("-o", "--output", type=Path, default=Path("fused"))
    parser.add_argument("-d", "--device", default="auto")
    args = parser.parse_args()

    report = fuse_files(
        args.moving_dir,
        args.fixed_dir,
        args.output,
        weights=args.weights,
        device=args.device,
        save_flow=args.output / "flows",
        progress=lambda done, total, name: print(f"[{done}/{total}] {name}"),
    )
    print(f"{len(report.ok)} fused, {len(report.skipped)} skipped, {len(report.failed)} failed")
    for item in report.failed:
        print(f"  {item.moving}: {item.error}")
    raise SystemExit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
