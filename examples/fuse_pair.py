"""Fuse one CT/PET/SPECT image with its MRI through the Python API.

    python examples/fuse_pair.py --weights path/to/best.pt                  # the bundled CT-MRI pair
    python examples/fuse_pair.py --weights best.pt --moving pet.png --fixed mri.png -o fused.png

The command-line equivalent is `bsafuse fuse MOVING FIXED -o OUT --weights W`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bsafuse import fuse, load_model
from bsafuse.io import read_image, write_image

DATA = Path(__file__).parent / "data"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", default="auto", help="checkpoint path or registry name (default: auto)")
    parser.add_argument("--moving", type=Path, default=DATA / "CT-MRI" / "CT" / "20010.png")
    parser.add_argument("--fixed", type=Path, default=DATA / "CT-MRI" / "MRI" / "20010.png")
    parser.add_argument("-o", "--output", type=Path, default=Path("fused.png"))
    parser.add_argument("-d", "--device", default="auto")
    args = parser.parse_args()

    moving, fixed = read_image(args.moving), read_image(args.fixed)
    model = load_model(args.weights, device=args.device, moving=moving)
    result = fuse(moving, fixed, model)
    write_image(args.output, result.fused, like=fixed)
    shift = (result.flow**2).sum(axis=0) ** 0.5
    print(f"wrote {args.output} in {result.seconds:.2f} s; mean displacement {shift.mean():.2f} px")


if __name__ == "__main__":
    main()
