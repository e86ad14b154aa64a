"""Classical pre-alignment: the rigid step's starts in one thread against several, side by side.

The pre-alignment (SimpleITK, `bsafuse/prealign.py`) is most of what `bsafuse fuse` spends on a
2-D pair: about 4-6 s on one core against 0.1-0.2 s for the network. Its rigid step optimises ten
independent starts and refines the best five; `workers` runs them in threads (SimpleITK releases
the GIL while it registers). For each example pair (examples/data, the moving image deformed with
the evaluation's default deformation, seed 0) and each kind, `register_stages` runs with one
worker and with `--workers`, alternating (A, B, A, B ...), and the flows are compared bit for bit.

    python benchmarks/bench_prealign.py [--workers 2] [--rounds 2] [--json]

Never run as a test.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from _common import REPO, interleaved, output, setup

EXAMPLES = REPO / "examples" / "data"
PAIRS = {"CT": "CT-MRI", "PET": "PET-MRI", "SPECT": "SPECT-MRI"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="threads for the rigid starts (against 1)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    facts = setup(threads=args.workers, tune=True)
    rows = []
    for moving_type, folder in PAIRS.items():
        moving, fixed = deformed_pair(folder, moving_type)
        rows += [
            row(moving, fixed, f"{moving_type}-MRI", kind, args.workers, args.rounds)
            for kind in ("rigid", "affine")
        ]
    facts.update(workers=args.workers, rounds=args.rounds)
    output(
        rows, facts, title="bsafuse pre-alignment, 256 x 256, one worker against several", as_json=args.json
    )
    return 0


def row(moving: Any, fixed: Any, pair: str, kind: str, workers: int, rounds: int) -> dict[str, Any]:
    """One pair and kind: seconds with one worker and with `workers`, alternating; the same flows?"""
    from bsafuse.prealign import register_stages

    flows: dict[int, tuple[Any, ...]] = {}

    def run(count: int) -> None:
        flows[count] = register_stages(moving, fixed, kind=kind, workers=count)  # type: ignore[arg-type]

    times = interleaved({"one": lambda: run(1), "several": lambda: run(workers)}, rounds=rounds, reps=1)
    one, several = statistics.median(times["one"]), statistics.median(times["several"])
    return {
        "pair": pair,
        "kind": kind,
        "one_worker_s": one,
        f"{workers}_workers_s": several,
        "x_one_worker": one / several,
        "same_flow": all((a == b).all() for a, b in zip(flows[1], flows[workers], strict=True)),
    }


def deformed_pair(folder: str, moving_type: str) -> tuple[Any, Any]:
    """An example pair with its moving image deformed as `bsafuse evaluate` does by default."""
    import numpy as np
    import torch

    from bsafuse.deform import DeformParams, random_deformation
    from bsafuse.io import read_image
    from bsafuse.io.color import rgb_to_ycbcr

    root = EXAMPLES / folder
    moving_file = next((root / moving_type).glob("*.png"))
    fixed = np.asarray(read_image(root / "MRI" / moving_file.name).pixels, np.float32)
    moving = np.asarray(read_image(moving_file).pixels, np.float32)
    if moving.ndim == 3:  # colour PET/SPECT: its luma, as the pipeline registers it
        moving = rgb_to_ycbcr(moving)[..., 0]
    deformed, _ = random_deformation(
        torch.from_numpy(moving)[None, None],
        params=DeformParams(),
        generator=torch.Generator().manual_seed(0),
    )
    return deformed[0, 0].numpy(), fixed


if __name__ == "__main__":
    raise SystemExit(main())
