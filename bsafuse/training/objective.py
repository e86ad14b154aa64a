"""The training objective: L_total of a network on a batch, and the sums of its terms over an epoch.

Sums rather than means travel between processes (a process's share of a batch may be smaller than
the others'), so a row is `summed(...)` over processes first and divided by the count after.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from bsafuse.config import LossWeights
from bsafuse.device import Precision, autocast_for
from bsafuse.losses import total_loss
from bsafuse.model.bsafusion import FusionOutput

Reduce = Callable[[Tensor], Tensor]  # adds a tensor over the processes (torchrun.ProcessGroup.all_sum)


def single_process(values: Tensor) -> Tensor:
    """The `Reduce` of a run without torchrun: nothing to add."""
    return values


@dataclass(frozen=True)
class Objective:
    """L_total (losses.total_loss) with the run's weights, on its device and under its precision."""

    weights: LossWeights
    device: torch.device
    precision: Precision = "fp32"

    def __call__(
        self, net: torch.nn.Module, batch: Mapping[str, Tensor], *, mu: float
    ) -> tuple[FusionOutput, Tensor, dict[str, Tensor]]:
        """`net` on a batch (moving, fixed, label, flow): its output, L_total and every term."""
        moving, fixed, label, flow_true = (
            batch[k].to(self.device, non_blocking=True) for k in ("moving", "fixed", "label", "flow")
        )
        with autocast_for(self.device, self.precision):
            out = net(moving, fixed)
            loss, terms = total_loss(
                out, moving=moving, fixed=fixed, label=label, mu=mu, weights=self.weights, flow_true=flow_true
            )
        return out, loss, terms


def accumulate(sums: dict[str, float], terms: Mapping[str, Tensor], n: int) -> None:
    """Add a batch of `n` samples: SSIM sums as they are, mean terms weighted by the batch size."""
    sums["count"] = sums.get("count", 0.0) + n
    names = sorted(terms)
    values = torch.stack([terms[k].float() for k in names]).tolist()  # one device sync per step
    for name, value in zip(names, values, strict=True):
        sums[name] = sums.get(name, 0.0) + value * (1 if name.startswith("ssim_") else n)


def summed(sums: Mapping[str, float], reduce: Reduce) -> dict[str, float]:
    """Sums added over all processes (every process must hold the same keys)."""
    keys = sorted(sums)
    total = reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
    return dict(zip(keys, total.tolist(), strict=True))
