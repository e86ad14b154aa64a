"""The fast path (bsafuse/model/speed.py) computes what the plain transcription computes.

Reference: the same weights in a model converted back to NCHW memory, run inside
``reference_path()`` (every rewrite off). Outputs must agree within 1e-4, for the small config and
for the paper config the benchmarks time. Gradients agree within 1e-3 of their scale: the gradient
of bilinear sampling with respect to the sampling grid jumps where a sample crosses a pixel edge,
so float rounding of the order of 1e-6 in the flow becomes ~1e-4 relative in the flow heads'
gradients (measured: 1.8e-4).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bsafuse.config import ModelConfig
from bsafuse.losses import total_loss
from bsafuse.model import BSAFusion
from bsafuse.model.align import FeatureUp
from bsafuse.model.speed import fast_path, pointwise_then_spatial, reference_path

TOLERANCE = 1e-4
GRAD_TOLERANCE = 1e-3


def build(cfg: ModelConfig, seed: int = 0) -> BSAFusion:
    """Seeded weights, with flow heads large enough that every warp moves features (a few px)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BSAFusion(cfg)
        with torch.no_grad():
            for layer in [*model.align.forward_layers, *model.align.reverse_layers]:
                layer.flow_head.weight.normal_(0.0, 0.01)
    return model


def reference_copy(model: BSAFusion) -> BSAFusion:
    return copy.deepcopy(model).to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]


def images(n: int, h: int, w: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(2 * n, 1, 6, 6, generator=g)
    both = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).clamp(0, 1)
    return both[:n], both[n:]


def assert_outputs_match(fast: tuple, ref: tuple) -> None:
    for name, a, b in zip(fast._fields, fast, ref, strict=True):  # type: ignore[attr-defined]
        for x, y in zip(
            a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True
        ):
            assert x.shape == y.shape, name
            error = (x.float() - y.float()).abs().max().item()
            assert error <= TOLERANCE, f"{name}: max difference {error:.2e}"


@pytest.mark.parametrize(("n", "h", "w"), [(2, 64, 64), (1, 48, 80)])
def test_small_config_forward_matches_the_reference(n: int, h: int, w: int) -> None:
    model = build(dataclasses.replace(ModelConfig.small(), image_size=64)).eval()
    reference = reference_copy(model)
    moving, fixed = images(n, h, w)
    with torch.inference_mode():
        fast = model(moving, fixed)
        with reference_path():
            ref = reference(moving, fixed)
    assert fast.flow.abs().max().item() > 1.0  # the warps really move things
    assert_outputs_match(fast, ref)


def test_paper_config_forward_matches_the_reference() -> None:
    model = build(ModelConfig.paper()).eval()
    reference = reference_copy(model)
    moving, fixed = images(1, 256, 256)
    with torch.inference_mode():
        fast = model(moving, fixed)
        with reference_path():
            ref = reference(moving, fixed)
    assert_outputs_match(fast, ref)


def test_training_gradients_match_the_reference() -> None:
    model = build(dataclasses.replace(ModelConfig.small(), image_size=64)).train()
    reference = reference_copy(model)
    moving, fixed = images(2, 64, 64)
    label = fixed.roll(1, dims=-1)
    loss, _ = total_loss(model(moving, fixed), moving=moving, fixed=fixed, label=label)
    loss.backward()
    with reference_path():
        ref_loss, _ = total_loss(reference(moving, fixed), moving=moving, fixed=fixed, label=label)
        ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=TOLERANCE)
    checked = 0
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name
            continue
        scale = max(1.0, q.grad.abs().max().item())
        assert (p.grad - q.grad).abs().max().item() <= GRAD_TOLERANCE * scale, name
        checked += 1
    assert checked > 100


@pytest.mark.parametrize("groups", [2, 3])
def test_composed_convolutions_keep_the_border_exact(groups: int) -> None:
    torch.manual_seed(0)
    pointwise = nn.Conv2d(4, 6 * groups, 1)
    spatial = nn.Conv2d(6 * groups, 6 * groups, 3, padding=1, groups=groups)
    nn.init.uniform_(pointwise.bias, 1.0, 2.0)  # type: ignore[arg-type]  # a bias the border must not see
    x = torch.rand(2, 4, 9, 7)
    for image in (x, torch.zeros_like(x)):
        expected = spatial(pointwise(image))
        assert (expected[..., 0, :] - expected[..., 4, :]).abs().max() > 0.1 or image.any()  # border differs
        assert torch.allclose(pointwise_then_spatial(image, pointwise, spatial), expected, atol=1e-5)


def test_feature_up_runs_its_1x1_conv_before_the_resize() -> None:
    torch.manual_seed(0)
    up = FeatureUp(8, 4)
    x = torch.rand(2, 8, 5, 6)
    with reference_path():
        expected = up(x)
    assert torch.allclose(up(x), expected, atol=1e-5)


def test_the_switch_is_scoped_and_checkpoints_are_unchanged() -> None:
    assert fast_path()
    with pytest.raises(RuntimeError), reference_path():
        assert not fast_path()
        raise RuntimeError
    assert fast_path()
    model = build(dataclasses.replace(ModelConfig.small(), image_size=64))
    plain = reference_copy(model)
    assert list(model.state_dict()) == list(plain.state_dict())
    restored = BSAFusion(model.config).to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    restored.load_state_dict(model.state_dict())  # channels_last tensors load into NCHW ones
    assert all(
        torch.equal(a, b)
        for a, b in zip(restored.state_dict().values(), model.state_dict().values(), strict=True)
    )
