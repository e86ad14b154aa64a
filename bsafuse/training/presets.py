"""The named recipes of `bsafuse train --preset`, as partial configs over TrainConfig's defaults.

`paper` is the recipe of design.md §3 (Adam 5e-5 with cosine decay to 5e-7, batch 32,
3000 epochs, lambda 0.5, mu updated every epoch) at the trained size, 256 px.

`quick` trains the `small` model at 64 px so that a run on the Harvard CT-MRI pairs (133 pairs,
116 of them for training with the default split) ends within 15 minutes on a 2-core CPU
(15 steps of 8 pairs per epoch, 110 epochs of about 7 s), with a validation registration error (mean
end-point error against the ground truth) below the error of not registering at all. It is a
demonstration and a smoke test of the whole pipeline, not a model to fuse real images with.
What makes registration learn in that budget (measured on CT-MRI, 2026-11/12):

- the supervised end-point term (LossWeights.flow = 5): with the paper's unsupervised terms
  alone the validation error stayed at the no-registration level after 65 epochs at 1e-4, and
  learning rates of 5e-4 and more pushed the moving image out of view (where the fused image
  falls back to the MRI, the fusion losses are content);
- a learning rate of 1e-3 (cosine to 1e-5) with the gradient norm clipped at 20: with the flow
  term it is stable, and the flow starts to track the deformation after ~200 steps at 128 px.

Deformation amplitudes are given for 256 px and scaled to the working size (data.scaled_deform),
and so is the flow heads' bound (network.model_config), so a quick run sees the misalignment the
paper recipe sees, relative to the anatomy.

Torch-free (the command line reads the vocabularies below for its --help).
"""

from __future__ import annotations

from typing import Any, Literal

Preset = Literal["quick", "paper", "residual"]
ModelSize = Literal["paper", "small"]  # ModelConfig.paper() / ModelConfig.small()

PRESETS: dict[Preset, dict[str, Any]] = {  # partial configs, nested
    # The dataclass defaults are the paper's recipe. Misaligning one 256 px pair costs about 90 ms
    # of one CPU core, so a GPU needs several loader processes to be kept busy at batch 32.
    "paper": {"run": {"workers": 8}},
    "quick": {
        "recipe": {
            "model": "small",
            "losses": {"flow": 5.0},  # see LossWeights.flow: registration learns in CPU minutes
            "image_size": 64,
            "epochs": 110,
            "batch_size": 8,
            "lr": 1e-3,
            "lr_min": 1e-5,
            "grad_clip": 20.0,
        },
        "run": {"val_every": 5, "workers": 0},
    },
    # The recipe of the shipped v2 weights: fine-tune (--init) the small network at 256 px on the
    # misalignment that rigid pre-alignment leaves. Measured on 15 deformed training pairs per
    # type (default deformation, 2026-12-01): rigid leaves a mean end-point error of 5.0 px (CT),
    # 4.1 px (PET) and 8.9 px (SPECT), 95th percentile 7-13 px; this deformation is about that size.
    "residual": {
        "recipe": {
            "model": "small",
            "losses": {"flow": 5.0},
            "image_size": 256,
            "epochs": 20,
            "batch_size": 8,
            "lr": 5e-4,
            "lr_min": 1e-5,
            "grad_clip": 20.0,
            "deform": {"rotate_deg": 4.0, "translate_px": 5.0, "scale": 0.04},
        },
        "run": {"val_every": 4, "workers": 0},
    },
}
