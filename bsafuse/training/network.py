"""The network of a training run: built fresh from the seed, fine-tuned from weights, or resumed.

Model initialisation draws from a generator forked off the run's seed (`seed_of`), never from the
caller's global random state, so two runs with one seed start from the same weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from bsafuse import data as data_mod
from bsafuse.choices import REFERENCE_SIZE
from bsafuse.config import FuseConfig, ModelConfig
from bsafuse.errors import InputError
from bsafuse.model import BSAFusion
from bsafuse.training.config import ModelSize, Recipe
from bsafuse.weights import load_checkpoint

INIT_STREAM, EPOCH_STREAM = 3, 4  # seed_of streams (data.py uses 0-2 for its own generators)


def seed_of(*parts: int) -> int:
    """A torch seed made from (seed, stream, epoch, index)-style parts alone."""
    return int(data_mod.item_generator(*parts).initial_seed())


def model_config(name: ModelSize, image_size: int) -> ModelConfig:
    """The `paper` or `small` ModelConfig, built for `image_size`.

    The flow heads' bound (AlignConfig.max_step, pixels per step at that step's scale) scales with
    the working size, so the largest correctable offset keeps the share of the image it has at
    256 px (62 px): about 15 px at 64 px. With the full 62 px at a small size, one large update
    of a coarse flow head can move the whole moving image out of view, where the warp reads only
    zeros and L_consis has no gradient left to bring it back (training collapses for good).
    """
    base = ModelConfig.paper() if name == "paper" else ModelConfig.small()
    assert base.image_size == REFERENCE_SIZE  # the presets are the 256 px networks
    return _resized(base, image_size)


def initial_model(weights: str, image_size: int, fuse: FuseConfig | None = None) -> BSAFusion:
    """The network of `weights` (registry name or path), rebuilt for `image_size`, for fine-tuning.

    The structure (channels, heads, depths) is the checkpoint's; the working size and the flow
    heads' bound follow `image_size` as in `model_config`. The learned positional map is resized
    to the new working size (bilinear, as the encoder itself does for other input sizes). With
    `fuse` of other widths than the checkpoint's, the fusion (MMFF) is built fresh at those widths
    (from the caller's random state) and only the other parts are loaded. Where only
    `fuse.anchor` differs, every weight is loaded and the reconstruction's last conv restarts:
    at zero for the "max" anchor (the network then starts at the pixel maximum), freshly drawn
    for "none".
    """
    from bsafuse.weights import read_checkpoint, resolve

    data = read_checkpoint(resolve(weights))
    stored = ModelConfig.from_dict(data["config"])
    model = BSAFusion(_with_fuse(_resized(stored, image_size), fuse))
    own = model.state_dict()
    fresh = fuse is not None and dataclasses.replace(fuse, anchor=stored.fuse.anchor) != stored.fuse
    state = {k: v for k, v in data["state_dict"].items() if not (fresh and k.startswith("fuse."))}
    for name, tensor in own.items():
        if name in state and state[name].shape != tensor.shape and name.endswith("position"):
            state[name] = torch.nn.functional.interpolate(
                state[name].float(), size=tensor.shape[-2:], mode="bilinear", align_corners=False
            ).to(tensor.dtype)
    state = {k: v.to(own[k].dtype) for k, v in state.items()}
    if fresh:
        state.update({k: v for k, v in own.items() if k.startswith("fuse.")})
    model.load_state_dict(state)
    if not fresh and fuse is not None and fuse.anchor != stored.fuse.anchor:
        reconstruction = model.fuse.reconstruction
        if reconstruction.anchored:
            reconstruction.start_at_anchor()
        else:
            reconstruction.out.reset_parameters()
    return model


def run_model(recipe: Recipe, resume: Mapping[str, Any] | None = None) -> BSAFusion:
    """The run's network: the checkpoint's when resuming, else from `recipe.init`, else fresh."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(recipe.seed, INIT_STREAM, 0, 0))
        if resume is not None:
            model = load_checkpoint(dict(resume))
        elif recipe.init is not None:
            model = initial_model(recipe.init, recipe.image_size, recipe.fuse)
        else:
            model = BSAFusion(_with_fuse(model_config(recipe.model, recipe.image_size), recipe.fuse))
    for name in recipe.freeze:  # these parts keep their weights (the optimiser skips them)
        getattr(model, name).requires_grad_(False)
    return model


def _resized(config: ModelConfig, image_size: int) -> ModelConfig:
    """`config` at another working size, its flow heads' bound scaled alike."""
    k = image_size / config.image_size
    align = dataclasses.replace(config.align, max_step=config.align.max_step * k)
    return dataclasses.replace(config, image_size=image_size, align=align)


def _with_fuse(config: ModelConfig, fuse: FuseConfig | None) -> ModelConfig:
    """`config` with the fusion widths `fuse` (recipe.fuse), where given."""
    if fuse is None:
        return config
    try:
        return dataclasses.replace(config, fuse=fuse)
    except ValueError as exc:  # e.g. a channel count per step the alignment does not have
        raise InputError(f"recipe.fuse {dataclasses.asdict(fuse)} does not fit the network: {exc}") from None
