"""Validation during training: registration error against the ground truth, and fusion quality.

Every validation item has one fixed deformation (data.MisalignedPairs with train=False), so the
numbers compare across epochs. Reported (means over the validation items, working-size pixels):

    val_epe       end-point error |flow - flow_true| of the network's flow over all pixels
                  (the best.pt score)
    val_epe_none  the same for no registration (flow = 0), i.e. mean |flow_true|: the bar to beat
    val_epe_fg, val_epe_none_fg   the same two over the anatomy only (pixels where the fixed image
                  or the aligned label exceeds FOREGROUND), where registration has something to see
    val_ncc       NCC of the warped moving image with the aligned label (val_ncc_none: unwarped)
    val_q_abf     Q_AB/F of the fused image against the label and the fixed image (0-255, as the
                  paper scores it)
    val_total     the training loss on the validation items (with the current mu)

Under torchrun each process scores its share of the items and `reduce` adds the sums.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bsafuse.metrics import endpoint_error, ncc, q_abf
from bsafuse.training.objective import Objective, Reduce, single_process, summed

FOREGROUND = 0.05  # intensity in [0, 1] above which a pixel is anatomy, not background

VAL_COLUMNS = (
    "val_epe",
    "val_epe_none",
    "val_epe_fg",
    "val_epe_none_fg",
    "val_ncc",
    "val_ncc_none",
    "val_q_abf",
    "val_total",
)


def _grey255(x: torch.Tensor) -> np.ndarray:
    return x[0].float().cpu().numpy().astype(np.float64) * 255.0


def validate(
    model: torch.nn.Module,
    items: Mapping[str, Tensor],
    *,
    objective: Objective,
    mu: float,
    batch_size: int,
    reduce: Reduce = single_process,
) -> dict[str, Any]:
    """Score `model` on this process's validation `items` (data.MisalignedPairs.materialise).

    Returns the metrics.csv columns VAL_COLUMNS: means over the items of every process.
    """
    sums = dict.fromkeys(("count", *VAL_COLUMNS), 0.0)
    n_items = len(items["moving"]) if items else 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, n_items, batch_size):
            batch = {k: v[start : start + batch_size].to(objective.device) for k, v in items.items()}
            out, _, terms = objective(model, batch, mu=mu)
            n = batch["moving"].shape[0]
            sums["count"] += n
            sums["val_total"] += float(terms["total"]) * n
            flow, truth = out.flow.float().cpu().numpy(), batch["flow"].cpu().numpy()
            for i in range(n):
                sums["val_epe"] += endpoint_error(flow[i], truth[i])["mean"]
                sums["val_epe_none"] += endpoint_error(np.zeros_like(truth[i]), truth[i])["mean"]
                anatomy = (batch["fixed"][i, 0] > FOREGROUND) | (batch["label"][i, 0] > FOREGROUND)
                mask = anatomy.cpu().numpy() if bool(anatomy.any()) else None
                sums["val_epe_fg"] += endpoint_error(flow[i], truth[i], mask)["mean"]
                sums["val_epe_none_fg"] += endpoint_error(np.zeros_like(truth[i]), truth[i], mask)["mean"]
                label = _grey255(batch["label"][i])
                sums["val_ncc"] += _finite(ncc(_grey255(out.warped[i]), label))
                sums["val_ncc_none"] += _finite(ncc(_grey255(batch["moving"][i]), label))
                fused, fixed = _grey255(out.fused[i]), _grey255(batch["fixed"][i])
                sums["val_q_abf"] += _finite(q_abf(fused, label, fixed))
    model.train(was_training)
    totals = summed(sums, reduce)
    count = max(totals.pop("count"), 1.0)
    return {k: totals[k] / count for k in VAL_COLUMNS}


def _finite(value: float) -> float:
    return 0.0 if math.isnan(value) else value
