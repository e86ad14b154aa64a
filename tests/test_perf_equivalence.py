"""The model's exact rewrites compute what the literal transcription of the paper computes.

The model's forward methods hold one form of each equation, an exact algebraic rewrite (its
identity commented where it is used; op-level ones in bsafuse/model/speed.py). The literal forms
live in bsafuse/model/reference.py as functions of a module's parameters. Here both run on the
same weights (the reference on a copy converted back to NCHW memory): each rewritten module
against its literal form, then whole networks. Outputs must agree within 1e-4, for the small
config and for the paper config the benchmarks time (there the full-size flow within 2e-4 px:
PAPER_FLOW_TOLERANCE says why). Gradients agree within 1e-3 of their scale:
the gradient of bilinear sampling with respect to the sampling grid jumps where a sample crosses
a pixel edge, so float rounding of the order of 1e-6 in the flow becomes ~1e-4 relative in the
flow heads' gradients (measured: 1.8e-4).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bsafuse.config import ModelConfig
from bsafuse.losses import total_loss
from bsafuse.model import BSAFusion, composed_conv, speed
from bsafuse.model import reference as ref
from bsafuse.model.align import FeatureUp, RegistrationLayer, SpatialCrossAttention
from bsafuse.model.blocks import ChannelAttention, RestormerBlock
from bsafuse.model.composed_conv import pointwise_then_spatial
from bsafuse.model.speed import channels_last, instance_norm

TOLERANCE = 1e-4
GRAD_TOLERANCE = 1e-3
# The paper config's full-size flow (pixels) and what it samples: its coarsest step flow, at
# 16 x 16, is scaled x16 to full-size pixels, and float rounding anywhere before it shows there.
# Measured: a 1e-7 relative change of the input moves the reference path's own flow by 5e-5 px
# and its coverage map by 3e-5, so two float32 forms of the same function differ by up to ~1e-4
# (the rewritten path: 8e-5 to 1.2e-4, by thread count). The fused image keeps TOLERANCE.
PAPER_FLOW_TOLERANCE = 2e-4
FULL_SIZE_FLOW_FIELDS = ("flow", "warped", "valid")


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


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


def assert_outputs_match(fast: tuple, literal: tuple, *, flow_tolerance: float = TOLERANCE) -> None:
    for name, a, b in zip(fast._fields, fast, literal, strict=True):  # type: ignore[attr-defined]
        tolerance = flow_tolerance if name in FULL_SIZE_FLOW_FIELDS else TOLERANCE
        for x, y in zip(
            a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True
        ):
            error = max_error(x, y)
            assert error <= tolerance, f"{name}: max difference {error:.2e}"


# one rewritten module against its literal form


def test_channel_attention_transposed_product_is_attn_times_v() -> None:
    torch.manual_seed(0)
    for heads in (1, 2):
        module = ChannelAttention(8, heads)
        x = torch.rand(2, 8, 9, 7)
        assert max_error(module(channels_last(x)), ref.channel_attention(module, x)) <= 1e-5


@pytest.mark.parametrize("channels", [8, 3])  # 3: the channel LayerNorm runs in NCHW memory
def test_restormer_block_matches_its_literal_form(channels: int) -> None:
    torch.manual_seed(0)
    block = RestormerBlock(3, channels, heads=1 if channels == 3 else 2, expansion=4)
    x = torch.rand(2, 3, 12, 10)
    assert max_error(block(x), ref.restormer_block(block, x)) <= 1e-5


@pytest.mark.parametrize("grad", [True, False])
def test_cross_attention_as_one_batch_is_both_ways_summed(grad: bool) -> None:
    torch.manual_seed(0)
    module = SpatialCrossAttention(6)
    d, f = torch.randn(2, 6, 8, 8), torch.randn(2, 6, 8, 8)
    with torch.set_grad_enabled(grad):
        fast = module(channels_last(d), channels_last(f))
    assert max_error(fast, ref.spatial_cross_attention(module, d, f)) <= 1e-5


@pytest.mark.parametrize("size", [(8, 8), (7, 9), (1, 1), (16, 5), (256, 256)])
def test_spatial_maxima_in_two_steps_are_the_maxima(size: tuple[int, int]) -> None:
    x = channels_last(torch.randn(3, 5, *size))
    x[1, 2, -1, -1] = 50.0  # the last pixel must reach the result
    x[2, 4, 0, min(1, size[1] - 1)] = 60.0
    x.requires_grad_(True)
    fast = speed.spatial_amax(x)
    assert torch.equal(fast, x.amax(dim=(-2, -1), keepdim=True))
    (grad,) = torch.autograd.grad((fast * torch.arange(15.0).view(3, 5, 1, 1)).sum(), x)
    assert grad[1, 2, -1, -1] == 7.0 and grad[2, 4, 0, min(1, size[1] - 1)] == 14.0
    assert grad.abs().sum() == torch.arange(15.0).sum()  # one maximum per map (no ties here)


def test_pointwise_conv_as_a_linear_map_keeps_nhwc_memory_and_gradients() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 1)
    x = channels_last(torch.randn(2, 6, 5, 7)).requires_grad_(True)
    out = speed.pointwise(x, conv)
    assert max_error(out, conv(x)) <= 1e-6
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.is_contiguous(memory_format=torch.channels_last)
    grad = x.grad.clone()
    x.grad = None
    conv(x).square().sum().backward()
    assert max_error(grad, x.grad) <= 1e-5


def test_pointwise_conv_at_inference_on_large_maps_runs_in_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a gradient, 8+ channels on 128 x 128+ pixels take oneDNN's NHWC 1x1 conv: the same
    numbers as the conv, NHWC out; with a gradient, fewer channels or a smaller map, the pixel rows."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 3, 1)
    x = channels_last(torch.randn(1, 8, 128, 128))
    small = channels_last(torch.randn(1, 8, 64, 128))
    calls: list[tuple[int, ...]] = []
    linear = F.linear
    monkeypatch.setattr(speed.F, "linear", lambda a, *rest: calls.append(tuple(a.shape)) or linear(a, *rest))
    with torch.inference_mode():
        out = speed.pointwise(x, conv)
        assert calls == []  # oneDNN's conv, not the matrix product
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert max_error(out, conv(x)) <= 1e-6
        speed.pointwise(x[:, :7], nn.Conv2d(7, 3, 1))  # 7 channels
        speed.pointwise(small, conv)  # 8192 pixels
    assert calls == [(1, 128 * 128, 7), (1, 64 * 128, 8)]
    speed.pointwise(x.requires_grad_(True), conv)  # a gradient to keep in NHWC: the pixel rows
    assert calls[-1] == (1, 128 * 128, 8)


def test_gelu_over_pixel_rows_is_gelu_to_the_bit_in_both_directions() -> None:
    torch.manual_seed(0)
    x = channels_last(torch.randn(2, 6, 5, 7) * 3).requires_grad_(True)
    plain = x.detach().contiguous().requires_grad_(True)  # NCHW: the same kernel as a flat run
    out = speed.gelu(x)
    assert torch.equal(out, F.gelu(plain)) and out.is_contiguous(memory_format=torch.channels_last)
    weights = channels_last(torch.randn(2, 6, 5, 7))  # an NHWC gradient from above, as in the network
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    (want,) = torch.autograd.grad((F.gelu(plain) * weights).sum(), plain)
    assert torch.equal(grad, want) and grad.is_contiguous(memory_format=torch.channels_last)
    nchw = torch.randn(1, 3, 4, 4)
    assert torch.equal(speed.gelu(nchw), F.gelu(nchw))


def test_channels_last_gradient_changes_only_the_gradients_layout() -> None:
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    y = speed.channels_last_gradient(x)
    assert torch.equal(y, x)
    (grad,) = torch.autograd.grad(y, x, torch.arange(120.0).view(2, 3, 4, 5))
    assert torch.equal(grad, torch.arange(120.0).view(2, 3, 4, 5))
    assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("next_channels", [4, None])
def test_registration_layer_runs_its_1x1_conv_before_the_resize(
    direction: str, next_channels: int | None
) -> None:
    torch.manual_seed(0)
    layer = RegistrationLayer(8, next_channels, direction=direction, max_step=1.0)  # type: ignore[arg-type]
    nn.init.normal_(layer.flow_head.weight, std=0.05)
    feat_a, feat_b, d = (torch.randn(2, 8, 5, 6) for _ in range(3))
    flow, up = layer(feat_a, feat_b, d)
    flow_ref, up_ref = ref.registration_layer(layer, feat_a, feat_b, d)
    assert max_error(flow, flow_ref) <= 1e-5
    if next_channels is None:
        assert up is None and up_ref is None
    else:
        assert up is not None and up_ref is not None and max_error(up, up_ref) <= 1e-5


def test_feature_up_runs_its_1x1_conv_before_the_resize() -> None:
    torch.manual_seed(0)
    up = FeatureUp(8, 4)
    x = torch.rand(2, 8, 5, 6)
    expected = ref.feature_up(up, x)  # instance-normalised: values up to ~4, so a relative bound
    assert max_error(up(x), expected) <= 1e-5 * max(1.0, expected.abs().max().item())


def test_alignment_resizes_the_step_flow_differences_once() -> None:
    model = build(dataclasses.replace(ModelConfig.small(), image_size=64))
    maps = torch.randn(2, 2, model.config.align.channels[0], 4, 4)
    fast = model.align(maps[0], maps[1], (64, 64))
    literal = ref.bidirectional_alignment(model.align, maps[0], maps[1], (64, 64))
    assert fast.flow.abs().max().item() > 1.0
    assert_outputs_match(fast, literal)


@pytest.mark.parametrize("groups", [2, 3])
def test_composed_convolutions_keep_the_border_exact(groups: int) -> None:
    torch.manual_seed(0)
    pointwise = nn.Conv2d(4, 6 * groups, 1)
    spatial = nn.Conv2d(6 * groups, 6 * groups, 3, padding=1, groups=groups)
    nn.init.uniform_(pointwise.bias, 1.0, 2.0)  # type: ignore[arg-type]  # a bias the border must not see
    x = torch.rand(2, 4, 9, 7)
    # one- and two-pixel rows and columns: both edges at once, or next to each other
    for image in (x, torch.zeros_like(x), x[..., :1, :], x[..., :, :1], x[..., :2, :], x[..., :, :2]):
        expected = spatial(pointwise(image))
        assert (expected[..., 0, :] - expected[..., -1, :]).abs().max() > 0.1 or image.any()  # border differs
        # with a gradient: the bias as an all-ones channel; without: a constant with its border fixed
        for grad, parts in itertools.product((True, False), (1, 2)):
            with torch.set_grad_enabled(grad):
                fast = torch.cat(pointwise_then_spatial(channels_last(image), pointwise, spatial, parts=parts), 1)
            assert torch.allclose(fast, expected, atol=1e-5), (grad, parts, tuple(image.shape))


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize(
    ("channels", "groups", "parts", "shape"),
    [(8, 2, 2, (3, 9, 7)), (8, 3, 1, (2, 1, 6)), (8, 2, 1, (1, 5, 1)), (4, 2, 2, (2, 2, 2))],
)
def test_composed_convolutions_own_backward_is_the_plain_gradient(
    onednn: bool,
    channels: int,
    groups: int,
    parts: int,
    shape: tuple[int, int, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CPU backward pass of the composed convs gives the gradients of the two plain convs, at
    1- and 2-pixel rows and columns too, both ways: oneDNN's on the real channels with the
    all-ones channel from sums (AVX-512), and im2col products with the samples split over several
    products (a small COLUMN_BYTES)."""
    monkeypatch.setattr(composed_conv, "_onednn_backward", lambda: onednn)
    monkeypatch.setattr(composed_conv, "COLUMN_BYTES", 1)  # im2col: one sample per product
    torch.manual_seed(0)
    pointwise = nn.Conv2d(channels, 4 * groups, 1)
    spatial = nn.Conv2d(4 * groups, 4 * groups, 3, padding=1, groups=groups)
    nn.init.uniform_(pointwise.bias, 1.0, 2.0)  # type: ignore[arg-type]
    n, h, w = shape
    x = torch.randn(n, channels, h, w)
    weights = torch.randn(n, 4 * groups, h, w)  # a loss that weighs every output differently
    params = [x, *pointwise.parameters(), *spatial.parameters()]

    def gradients(fast: bool) -> list[Tensor]:
        image = channels_last(x).requires_grad_(True)
        out = torch.cat(pointwise_then_spatial(image, pointwise, spatial, parts=parts), 1) if fast else (
            spatial(pointwise(image))
        )
        return list(torch.autograd.grad((out * weights).sum(), [image, *params[1:]]))

    calls: list[str] = []
    for name in ("_onednn_gradients", "_im2col_gradients"):
        real = getattr(composed_conv, name)
        monkeypatch.setattr(composed_conv, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    fast_gradients = gradients(True)
    own = composed_conv._own_backward(channels_last(x))
    assert own == (onednn or channels >= 8)  # im2col's from 8 channels
    assert calls == ([("_onednn_gradients" if onednn else "_im2col_gradients")] if own else [])
    for fast, plain in zip(fast_gradients, gradients(False), strict=True):
        assert fast.shape == plain.shape
        assert max_error(fast, plain) <= 1e-5 * max(1.0, plain.abs().max().item())
    assert not composed_conv._own_backward(x[:, :3])  # 3 channels: autograd's backward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not composed_conv._own_backward(x)  # autocast: autograd's backward


def test_all_ones_channel_gradient_by_hand() -> None:
    """2 x 3 output gradient of one channel: tap (0, 0) reads the pixel up and left, so only the
    output pixel (1, 1) and (1, 2) have it in the image; the centre tap sees all six."""
    grad = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]]).view(1, 1, 2, 3)
    expected = torch.tensor([[16.0 + 32.0, 8.0 + 16.0 + 32.0, 8.0 + 16.0],
                             [2.0 + 4.0 + 16.0 + 32.0, 63.0, 1.0 + 2.0 + 8.0 + 16.0],
                             [2.0 + 4.0, 1.0 + 2.0 + 4.0, 1.0 + 2.0]])
    assert torch.equal(composed_conv._ones_gradient(channels_last(grad))[0], expected)


def test_instance_norm_as_group_norm_keeps_nhwc_memory() -> None:
    norm = nn.InstanceNorm2d(5)
    x = channels_last(torch.randn(2, 5, 6, 7))
    out = instance_norm(x, norm)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert max_error(out, norm(x)) <= 1e-5


# whole networks


@pytest.mark.parametrize(("n", "h", "w", "anchor"), [(2, 64, 64, "none"), (1, 48, 80, "max")])
@pytest.mark.slow
def test_small_config_forward_matches_the_reference(n: int, h: int, w: int, anchor: Literal["none", "max"]) -> None:
    config = dataclasses.replace(ModelConfig.small(), image_size=64)
    model = build(dataclasses.replace(config, fuse=dataclasses.replace(config.fuse, anchor=anchor))).eval()
    if anchor == "max":  # a trained correction, not the zero it starts at
        torch.nn.init.normal_(model.fuse.reconstruction.out.weight, std=0.2, generator=torch.Generator().manual_seed(3))
    plain = reference_copy(model)
    moving, fixed = images(n, h, w)
    with torch.inference_mode():
        fast = model(moving, fixed)
        literal = ref.reference_forward(plain, moving, fixed)
    assert fast.flow.abs().max().item() > 1.0  # the warps really move things
    assert_outputs_match(fast, literal)


@pytest.mark.slow
def test_paper_config_forward_matches_the_reference() -> None:
    model = build(ModelConfig.paper()).eval()
    plain = reference_copy(model)
    moving, fixed = images(1, 256, 256)
    with torch.inference_mode():
        fast = model(moving, fixed)
        literal = ref.reference_forward(plain, moving, fixed)
    assert_outputs_match(fast, literal, flow_tolerance=PAPER_FLOW_TOLERANCE)


@pytest.mark.slow
def test_training_gradients_match_the_reference() -> None:
    model = build(dataclasses.replace(ModelConfig.small(), image_size=64)).train()
    plain = reference_copy(model)
    moving, fixed = images(2, 64, 64)
    label = fixed.roll(1, dims=-1)
    loss, _ = total_loss(model(moving, fixed), moving=moving, fixed=fixed, label=label)
    loss.backward()
    ref_loss, _ = total_loss(
        ref.reference_forward(plain, moving, fixed), moving=moving, fixed=fixed, label=label
    )
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=TOLERANCE)
    checked = 0
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        scale = max(1.0, q.grad.abs().max().item())
        assert (p.grad - q.grad).abs().max().item() <= GRAD_TOLERANCE * scale, name
        checked += 1
    assert checked > 100


def test_inference_without_transfer_scores_gives_the_same_images_and_flows() -> None:
    model = build(dataclasses.replace(ModelConfig.small(), image_size=64)).eval()
    moving, fixed = images(2, 64, 64)
    with torch.inference_mode():
        full = model(moving, fixed)
        lean = model(moving, fixed, transfer_scores=False)
    assert lean.logits_moving_transfer is None and lean.logits_fixed_transfer is None
    assert full.logits_moving_transfer is not None
    for name in ("fused", "flow", "warped", "valid", "logits_moving"):
        assert torch.equal(getattr(full, name), getattr(lean, name)), name
    with pytest.raises(ValueError, match="transfer_scores=True"):
        total_loss(lean, moving=moving, fixed=fixed, label=moving)


def test_one_form_no_switch_and_checkpoints_are_unchanged() -> None:
    assert not hasattr(speed, "fast_path") and not hasattr(speed, "reference_path")
    model = build(dataclasses.replace(ModelConfig.small(), image_size=64)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moving, fixed = images(1, 64, 64)
    with torch.inference_mode():
        first = model(moving, fixed)
        ref.reference_forward(model, moving, fixed)  # patches nothing: the model is as it was
        again = model(moving, fixed)
    assert all(torch.equal(a, b) for a, b in zip(first[:4], again[:4], strict=True))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    plain = reference_copy(model)
    assert list(model.state_dict()) == list(plain.state_dict())
    restored = BSAFusion(model.config).to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    restored.load_state_dict(model.state_dict())  # channels_last tensors load into NCHW ones
    assert all(
        torch.equal(a, b)
        for a, b in zip(restored.state_dict().values(), model.state_dict().values(), strict=True)
    )
