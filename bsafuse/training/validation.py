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
                  paper scores it), when config.quality_metrics is on
    val_total     the training loss on the validation items (with the current mu)

Under torchrun each process scores its share of the items and the sums are added.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bsafuse.metrics import endpoint_error, ncc, q_abf
from bsafuse.training.distributed import all_sum

FOREGROUND = 0.05  # intensity in [0, 1] above which a pixel is anatomy, not background

if TYPE_CHECKING:
    from bsafuse.training.trainer import Trainer

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


def validate(trainer: Trainer, *, mu: float) -> dict[str, Any]:
    """Score the model on this process's validation items; sums over all processes."""
    model, device, items = trainer.model, trainer.device, trainer.val_items
    keys = ("count", *VAL_COLUMNS)
    sums = dict.fromkeys(keys, 0.0)
    n_items = len(items["moving"]) if items else 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, n_items, trainer.local_batch):
            batch = {k: v[start : start + trainer.local_batch].to(device) for k, v in items.items()}
            out, _, terms = trainer.forward_loss(model, batch, mu=mu)
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
                if trainer.config.quality_metrics:
                    sums["val_q_abf"] += _finite(
                        q_abf(_grey255(out.fused[i]), label, _grey255(batch["fixed"][i]))
                    )
    model.train(was_training)
    totals = all_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64), trainer.dist).tolist()
    count = max(totals[0], 1.0)
    row: dict[str, Any] = {k: v / count for k, v in zip(VAL_COLUMNS, totals[1:], strict=True)}
    if not trainer.config.quality_metrics:
        row["val_q_abf"] = None
    return row


def _finite(value: float) -> float:
    return 0.0 if math.isnan(value) else value
