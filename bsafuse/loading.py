"""One way to get a model: ``load_model(name | path | "auto", device)``.

```python
model = load_model("ct-mri", device="cpu")       # a shipped name (sha256-verified), a path, or "auto"
model.provenance                                  # Provenance(name='ct-mri-v2', path=..., sha256=...)
```

"auto" picks the shipped weights that fit the moving image (`weights.auto_name`: the modality
first, then grey or colour). Every file is read with ``torch.load(weights_only=True)``; a shipped
file is verified against its published sha256 each time. The model comes back in eval mode on the
device, with its `provenance`: what `fuse --json`, reports and `evaluate`'s summary.json record
as "the weights used".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bsafuse import weights as weights_mod
from bsafuse.errors import WeightsError

if TYPE_CHECKING:
    import torch

    from bsafuse._pair import ImageLike
    from bsafuse.model import BSAFusion


@dataclass(frozen=True)
class Provenance:
    """Where a model's weights came from."""

    name: str | None  # the registry name (e.g. "ct-mri-v2"); None for a checkpoint file of one's own
    path: Path | None  # None for a model built in memory
    sha256: str | None

    @property
    def label(self) -> str:
        """How reports name the weights: the registry name, else the file, else 'model given'."""
        return self.name or (str(self.path) if self.path is not None else "model given by the caller")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.label, "path": None if self.path is None else str(self.path), "sha256": self.sha256}


IN_MEMORY = Provenance(None, None, None)


def provenance_of(model: object) -> Provenance:
    """A model's provenance; IN_MEMORY for one that `load_model` did not load."""
    found = getattr(model, "provenance", None)
    return found if isinstance(found, Provenance) else IN_MEMORY


def choose(
    weights: str | os.PathLike[str] = "auto",
    moving: ImageLike | str | os.PathLike[str] | None = None,
    *,
    modality: str | None = None,
) -> str:
    """The registry name (e.g. "ct-mri-v2") or path that `weights` stands for.

    "auto" goes by `modality` when given (a DICOM Modality such as CT, PT, NM, or a data folder's
    name such as PET), else by the moving image (its DICOM Modality, else grey or colour), else
    ct-mri.
    """
    text = os.fspath(weights)
    if text != "auto":
        return weights_mod.canonical(text)
    colour = False
    if modality is None and moving is not None:
        from bsafuse.io import MedicalImage, read_image

        if isinstance(moving, MedicalImage | str | os.PathLike):
            image = moving if isinstance(moving, MedicalImage) else read_image(moving)
            colour, modality = image.is_colour, image.modality
        else:
            array = np.asarray(moving)
            colour = array.ndim == 3 and array.shape[-1] == 3
    return weights_mod.canonical(weights_mod.auto_name(is_colour=colour, modality=modality))


def load_model(
    weights: str | os.PathLike[str] = "auto",
    device: str | torch.device = "auto",
    *,
    moving: ImageLike | str | os.PathLike[str] | None = None,
    modality: str | None = None,
) -> BSAFusion:
    """A BSAFusion model in eval mode on `device`, from a registry name, a checkpoint file or "auto".

    `moving` (an image, array or file) and `modality` only matter for "auto" (see `choose`).
    Raises WeightsError for unknown names, missing, corrupt or unsafe files.
    """
    from bsafuse.device import pick_device

    choice = choose(weights, moving, modality=modality)
    try:
        path = weights_mod.resolve(choice)
    except WeightsError as exc:
        if os.fspath(weights) == "auto":
            raise WeightsError(f"--weights auto chose {choice!r}, but {exc}") from None
        raise
    model = weights_mod.load_checkpoint(path).to(pick_device(device)).eval()
    registered = weights_mod.REGISTRY.get(choice)
    # a registered file was just verified against its published sha256 (weights.resolve): no second read
    digest = registered.sha256.lower() if registered is not None else weights_mod.sha256_of(path)
    model.provenance = Provenance(name=choice if registered is not None else None, path=path, sha256=digest)
    return model
