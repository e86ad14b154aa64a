"""Per-pair facts behind the default pipeline's nearly-aligned rules (design.md §5, model card).

For every deformed pair of an aligned data folder (the evaluation's deformation, seeded as
`bsafuse evaluate` seeds it), one JSON line: the rigid pre-alignment's mean move `r` (px), the
mean length `n` of the network's flow on the unregistered pair, the normalised mutual information
of the pair before and after the rigid step, and the mean end-point error and NCC of four
registrations: none, the network alone (`net`), rigid alone, and rigid then the network (`rn`).
Rules over `r`, `n` and the NMI can then be scored offline without rerunning anything.

    python tools/prealign_probe.py ../shared/data/harvard/SPECT-MRI --weights spect-mri-v2 \\
        --motion small --cases 28,36 > spect-small.jsonl

One CPU thread; about 4 s a pair at 256 px.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

MOTIONS = {  # the model card's three deformations (bsafuse evaluate's options)
    "small": {"rotate_deg": 0.0, "translate_px": 2.0, "scale": 0.0, "elastic_px": 2.0},
    "default": {},
    "large": {"rotate_deg": 20.0, "translate_px": 20.0},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="an aligned pair folder (MRI/ plus CT/, PET/ or SPECT/)")
    parser.add_argument("--weights", required=True, help="registry name or checkpoint path")
    parser.add_argument("--motion", choices=tuple(MOTIONS), default="small")
    parser.add_argument("--cases", help="comma-separated case numbers (default: every pair)")
    parser.add_argument("--limit", type=int, help="at most this many pairs, spread over the selection")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from pathlib import Path

    from bsafuse import load_model
    from bsafuse.deform import DeformParams
    from bsafuse.evaluation.cases import find_sources, load_case
    from bsafuse.evaluation.scoring import registration_scores
    from bsafuse.metrics import normalised_mutual_information as nmi
    from bsafuse.prealign import register_classical
    from bsafuse.registration_steps import network_pass
    from bsafuse.warp import compose_flows, warp

    torch.set_num_threads(1)
    model = load_model(args.weights, "cpu")
    _, _, sources = find_sources(Path(args.data))
    if args.cases:
        wanted = set(args.cases.split(","))
        sources = [s for s in sources if s.case in wanted]
    if args.limit:
        sources = sources[:: max(1, len(sources) // args.limit)][: args.limit]
    params = DeformParams(**MOTIONS[args.motion])  # type: ignore[arg-type]

    def image(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, np.float32))[None, None]

    for source in sources:
        case = load_case(source, seed=args.seed, params=params)
        moving, fixed = image(case.moving), image(case.fixed)
        rigid = torch.from_numpy(register_classical(case.moving, case.fixed, kind="rigid"))[None]
        _, alone = network_pass(model, moving, fixed, "fp32")
        _, after_rigid = network_pass(model, warp(moving, rigid), fixed, "fp32")
        flows = {"none": torch.zeros_like(alone), "net": alone, "rigid": rigid,
                 "rn": compose_flows(rigid, after_rigid)}  # fmt: skip
        row = {
            "name": source.name,
            "case": source.case,
            "r": float(rigid.norm(dim=1).mean()),
            "n": float(alone.norm(dim=1).mean()),
            "nmi_id": float(nmi(case.moving, case.fixed)),
            "nmi_rigid": float(nmi(warp(moving, rigid)[0, 0].numpy(), case.fixed)),
        }
        for name, flow in flows.items():
            scores = registration_scores(
                flow=flow[0].numpy(), warped=warp(moving, flow)[0, 0].numpy(),
                flow_true=case.flow_true, label=case.label,
            )  # fmt: skip
            row[name], row[f"{name}_ncc"] = scores["epe_mean"], scores["ncc"]
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
