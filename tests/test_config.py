"""config.py: presets, dict round trips and validation messages."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bsafuse.config import AlignConfig, EncoderConfig, FuseConfig, LossWeights, ModelConfig


def test_paper_preset_has_the_authors_sizes() -> None:
    cfg = ModelConfig.paper()
    assert cfg.image_size == 256 and cfg.stride == 16
    assert cfg.encoder.dim == 256 and cfg.encoder.heads == 4
    assert cfg.encoder.shallow_channels == 8 and cfg.encoder.token_channels == 3
    assert cfg.align.channels == (256, 64, 32, 16, 8) and cfg.align.steps == 5
    assert cfg.fuse.channels == (64, 32, 16, 12)


@pytest.mark.parametrize("preset", ["paper", "small"])
def test_dict_round_trip_is_exact_and_json_safe(preset: str) -> None:
    cfg = getattr(ModelConfig, preset)()
    data = cfg.to_dict()
    again = ModelConfig.from_dict(json.loads(json.dumps(data)))
    assert again == cfg
    assert isinstance(again.align.channels, tuple)


def test_configs_given_lists_equal_the_presets_and_hash() -> None:
    # __post_init__ turns list fields into tuples: a config built from lists (as a user or JSON
    # gives them) is the preset itself, and frozen configs stay usable as dict keys.
    built = ModelConfig(
        align=AlignConfig(channels=[256, 64, 32, 16, 8]),  # type: ignore[arg-type]
        fuse=FuseConfig(channels=[64, 32, 16, 12], heads=[4, 2, 1, 1]),  # type: ignore[arg-type]
    )
    assert built == ModelConfig.paper() and hash(built) == hash(ModelConfig.paper())
    assert isinstance(built.align.channels, tuple) and isinstance(built.fuse.heads, tuple)
    weights = LossWeights(smooth_steps=[1, 2, 3, 4, 5])  # type: ignore[arg-type]
    assert weights.smooth_steps == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert hash(weights) == hash(LossWeights(smooth_steps=(1, 2, 3, 4, 5)))


def test_replace_keeps_validation() -> None:
    assert dataclasses.replace(ModelConfig.small(), image_size=64).image_size == 64
    with pytest.raises(ValueError, match=r"image_size \(72\) must be a multiple of 16"):
        dataclasses.replace(ModelConfig.small(), image_size=72)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: EncoderConfig(dim=250, heads=4), r"dim \(250\) must be divisible by heads \(4\)"),
        (lambda: EncoderConfig(depth=0), r"EncoderConfig.depth must be positive, got 0"),
        (
            lambda: EncoderConfig(shallow_channels=8, shallow_heads=3),
            r"channels \(8\) must be divisible by heads",
        ),
        (lambda: AlignConfig(channels=(256,)), r"at least 2 steps"),
        (lambda: AlignConfig(max_step=0.0), r"max_step must be positive"),
        (
            lambda: FuseConfig(channels=(64, 32, 16, 12), heads=(4, 2, 1)),
            r"4 channel counts but 3 head counts",
        ),
        (lambda: FuseConfig(anchor="min"), r"FuseConfig.anchor must be 'none' or 'max', got 'min'"),  # type: ignore[arg-type]
        (lambda: ModelConfig(ffn_expansion=0), r"ffn_expansion must be positive"),
        (
            lambda: ModelConfig(align=AlignConfig(channels=(128, 64, 32, 16, 8))),
            r"align.channels\[0\] \(128\) must equal encoder.dim \(256\)",
        ),
        (
            lambda: ModelConfig(fuse=FuseConfig(channels=(64, 32, 16), heads=(4, 2, 1))),
            r"fuse.channels needs K - 1 = 4 entries",
        ),
    ],
)
def test_bad_values_raise_value_error_naming_them(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()  # type: ignore[operator]


def test_checkpoints_that_stored_the_patch_size_still_load() -> None:
    stored = ModelConfig.paper().to_dict()
    assert "patch" not in stored["encoder"]  # derived: the stride 2**(K-1)
    legacy = {**stored, "encoder": {**stored["encoder"], "patch": 16}}
    assert ModelConfig.from_dict(legacy) == ModelConfig.paper()
    with pytest.raises(ValueError, match=r"encoder.patch \(8\) must equal 2\*\*\(K-1\) = 16"):
        ModelConfig.from_dict({**stored, "encoder": {**stored["encoder"], "patch": 8}})


def test_checkpoints_from_before_the_fusion_anchor_load_without_one() -> None:
    stored = ModelConfig.small().to_dict()
    assert stored["fuse"]["anchor"] == "none"
    del stored["fuse"]["anchor"]
    assert ModelConfig.from_dict(stored) == ModelConfig.small()


def test_from_dict_refuses_unknown_and_mistyped_keys() -> None:
    data = ModelConfig.small().to_dict()
    data["encoder"]["depht"] = 2
    with pytest.raises(ValueError, match=r"config.encoder has no setting 'depht'"):
        ModelConfig.from_dict(data)
    with pytest.raises(ValueError, match=r"config.align must be a table of settings, got 3"):
        ModelConfig.from_dict({**ModelConfig.small().to_dict(), "align": 3})
    with pytest.raises(ValueError, match=r"config.encoder.dim must be an integer, got '256'"):
        ModelConfig.from_dict({**ModelConfig.small().to_dict(), "encoder": {"dim": "256"}})
    with pytest.raises(ValueError, match=r"config.align.channels must be a list, got 8"):
        ModelConfig.from_dict({**ModelConfig.small().to_dict(), "align": {"channels": 8}})
    with pytest.raises(ValueError, match=r"config must be a table of settings, got \[1, 2\]"):
        ModelConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_loss_weights_defaults_and_checks() -> None:
    w = LossWeights()
    assert w.inten == 0.5  # lambda of Eq. 14
    assert len(w.smooth_steps) == ModelConfig.paper().align.steps
    assert all(a < b for a, b in zip(w.smooth_steps, w.smooth_steps[1:], strict=False))
    with pytest.raises(ValueError, match=r"LossWeights.grad must be >= 0, got -1"):
        LossWeights(grad=-1)
    with pytest.raises(ValueError, match=r"smooth_steps must be >= 0"):
        LossWeights(smooth_steps=(1.0, -1.0))
