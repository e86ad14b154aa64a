"""The BSAFusion network: shapes, ranges, gradients, the flow sign, borders, checkpoints, learning."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bsafuse.config import ModelConfig
from bsafuse.losses import total_loss
from bsafuse.model import BSAFusion, FusionOutput
from bsafuse.model.encoder import inject_modality
from bsafuse.warp import warp
from bsafuse.weights import read_checkpoint

SIZE = 64  # test images, pixels


def build(cfg: ModelConfig, seed: int = 0) -> BSAFusion:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BSAFusion(cfg)


def small_config() -> ModelConfig:
    return dataclasses.replace(ModelConfig.small(), image_size=SIZE)


def pair(generator: torch.Generator, n: int = 2, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Two smooth random images in [0, 1] per sample."""
    coarse = torch.rand(2 * n, 1, 8, 8, generator=generator)
    images = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).clamp(0, 1)
    return images[:n], images[n:]


@pytest.fixture(scope="module")
def small() -> BSAFusion:
    return build(small_config()).eval()


@pytest.fixture(scope="module")
def paper() -> Iterator[BSAFusion]:
    yield build(ModelConfig.paper()).eval()


def check_output(out: FusionOutput, n: int, size: int, steps: int) -> None:
    assert out.fused.shape == out.warped.shape == out.valid.shape == (n, 1, size, size)
    assert out.flow.shape == (n, 2, size, size) and out.flow.dtype == torch.float32
    assert 0.0 <= out.fused.min().item() and out.fused.max().item() <= 1.0
    assert 0.0 <= out.valid.min().item() and out.valid.max().item() <= 1.0
    for flows in (out.flows_moving, out.flows_fixed):
        sides = [f.shape[-1] for f in flows]
        assert len(flows) == steps and sides == [size >> (steps - 1 - i) for i in range(steps)]
    for logits in out[6:]:
        assert logits.shape == (n, 2)
    assert all(torch.isfinite(t).all() for t in (out.fused, out.flow, out.warped))


def test_small_shapes_range_and_identity_start(small: BSAFusion, generator: torch.Generator) -> None:
    moving, fixed = pair(generator)
    with torch.inference_mode():
        out = small(moving, fixed)
    check_output(out, 2, SIZE, 5)
    assert out.flow.abs().max().item() < 0.5  # untrained: near the identity warp
    assert torch.equal(out.warped, warp(moving, out.flow))


def test_non_square_inputs_that_are_multiples_of_16_work(small: BSAFusion) -> None:
    with torch.inference_mode():
        out = small(torch.rand(1, 1, 48, 80), torch.rand(1, 1, 48, 80))
    assert out.fused.shape == (1, 1, 48, 80) and out.flows_moving[0].shape == (1, 2, 3, 5)


def test_paper_shapes_range_size_and_identity_start(paper: BSAFusion, generator: torch.Generator) -> None:
    # Every parameter, the learned positional map (196 608) and the frozen copy of the modality
    # classifier (858 370, Eq. 3) included; nothing is a buffer. (The "about 10.03 M" this test
    # once aimed at is the authors' implementation, 10 028 296 counted from its code: its frozen
    # copy also holds an unused patch embedding and positional map, its fusion extra 1x1 convs.)
    assert sum(p.numel() for p in paper.parameters()) == 9_878_122  # README and config.py say so
    assert sum(p.numel() for p in paper.parameters() if p.requires_grad) == 9_019_752
    assert sum(p.numel() for p in paper.scorer.parameters()) == 858_370
    assert sum(b.numel() for b in paper.buffers()) == 0
    moving, fixed = pair(generator, n=1, size=256)
    with torch.inference_mode():
        out = paper(moving, fixed)
    check_output(out, 1, 256, 5)
    assert out.flow.abs().max().item() < 0.5


def test_batch_items_do_not_mix(small: BSAFusion, generator: torch.Generator) -> None:
    moving, fixed = pair(generator)
    with torch.inference_mode():
        both = small(moving, fixed)
        first = small(moving[:1], fixed[:1])
    for a, b in zip(first[:4], both[:4], strict=True):
        assert torch.allclose(a, b[:1], atol=1e-5)


def test_every_trainable_parameter_learns_and_the_scorer_does_not(generator: torch.Generator) -> None:
    model = build(small_config()).train()
    moving, fixed = pair(generator)
    out = model(moving, fixed)
    loss, _ = total_loss(out, moving=moving, fixed=fixed, label=moving)
    loss.backward()
    silent = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert silent == []
    scorer = list(model.scorer.parameters())
    assert scorer and all(not p.requires_grad and p.grad is None for p in scorer)


def test_refresh_copies_the_encoder_into_the_frozen_scorer() -> None:
    model = build(small_config())
    with torch.no_grad():
        model.encoder.classifier.mlp[1].weight.add_(1.0)
        model.encoder.layers[-1].mlp[0].bias.add_(1.0)
    assert not torch.equal(model.scorer.classifier.mlp[1].weight, model.encoder.classifier.mlp[1].weight)
    model.refresh_modality_scorer()
    assert torch.equal(model.scorer.classifier.mlp[1].weight, model.encoder.classifier.mlp[1].weight)
    assert torch.equal(model.scorer.layers[-1].mlp[0].bias, model.encoder.layers[-1].mlp[0].bias)
    assert all(not p.requires_grad for p in model.scorer.parameters())


def test_class_token_sits_and_is_read_at_position_0(small: BSAFusion, generator: torch.Generator) -> None:
    tokens = torch.randn(2, 5, 4, generator=generator)
    head = torch.randn(2, 4, generator=generator)
    injected = inject_modality(tokens, head)
    assert torch.equal(injected[:, 0], tokens[:, 0])  # Eq. 2 acts on patch tokens only
    assert torch.allclose(injected[:, 1:], tokens[:, 1:] + head[:, None])
    with torch.inference_mode():
        enc = small.encoder(pair(generator)[0])
        assert enc.tokens.shape[1] == 1 + (SIZE // 16) ** 2
        assert torch.equal(enc.logits, small.encoder.classifier(enc.tokens[:, 0]))


# the flow convention, with step flows planted by hand


def plant(
    model: BSAFusion, forward: dict[int, tuple[float, float]], reverse: dict[int, tuple[float, float]]
) -> None:
    """Make every step flow a chosen constant (pixels of its scale): zero weights, atanh bias."""
    bound = model.config.align.max_step
    for layers, plan in ((model.align.forward_layers, forward), (model.align.reverse_layers, reverse)):
        for i, layer in enumerate(layers):
            with torch.no_grad():
                layer.flow_head.weight.zero_()
                layer.flow_head.bias.copy_(torch.atanh(torch.tensor(plan.get(i, (0.0, 0.0))) / bound))


def test_planted_flows_sum_as_eq7_and_warp_moving_onto_fixed(generator: torch.Generator) -> None:
    model = build(small_config()).eval()
    # phi_A: 0.5 px in x at the finest step; phi_B: -0.5 px in x at the finest step and
    # 0.1 px in y at the coarsest (4 x 4) step, i.e. 0.1 * 63 / 3 = 2.1 px at 64 x 64
    plant(model, forward={4: (0.5, 0.0)}, reverse={4: (-0.5, 0.0), 0: (0.0, 0.1)})
    t = torch.tensor([1.0, -2.1])  # phi = phi_A - phi_B
    fixed = pair(generator, n=1)[0]
    moving = warp(fixed, -t.view(1, 2, 1, 1).expand(1, 2, SIZE, SIZE))  # fixed moved by t
    with torch.inference_mode():
        out = model(moving, fixed)
    assert torch.allclose(out.flow, t.view(1, 2, 1, 1).expand_as(out.flow), atol=1e-4)
    assert out.flows_moving[4][0, 0].mean().item() == pytest.approx(0.5, abs=1e-5)
    assert out.flows_fixed[0][0, 1].mean().item() == pytest.approx(0.1, abs=1e-5)
    inner = (..., slice(6, -6), slice(6, -6))
    assert (out.warped - fixed)[inner].abs().max().item() < 0.02  # warp(moving, flow) lies on fixed
    assert (moving - fixed)[inner].abs().max().item() > 0.05


def test_fused_follows_fixed_where_moving_has_no_data(generator: torch.Generator) -> None:
    model = build(small_config()).eval()
    plant(model, forward={0: (0.9, 0.0)}, reverse={})  # 0.9 * 63 / 3 = 18.9 px to the right
    moving, fixed = pair(generator, n=1)
    fixed = fixed * 0.5 + 0.25  # no black in the fixed image: a wedge would show
    with torch.inference_mode():
        out = model(moving, fixed)
    assert out.flow[:, 0].mean().item() == pytest.approx(18.9, abs=1e-3)
    outside = (..., slice(None), slice(46, None))  # x + 18.9 > 63: beyond the moving image
    assert out.valid[outside].max().item() == 0.0 and out.warped[outside].abs().max().item() == 0.0
    assert torch.equal(out.fused[outside], fixed[outside])
    assert out.valid[..., :40].min().item() == 1.0


def test_max_anchor_starts_at_the_pixel_maximum_and_learns_a_correction(generator: torch.Generator) -> None:
    config = small_config()
    model = build(dataclasses.replace(config, fuse=dataclasses.replace(config.fuse, anchor="max"))).eval()
    plant(model, forward={0: (0.3, 0.0)}, reverse={})  # 0.3 * 63 / 3 = 6.3 px to the right
    moving, fixed = pair(generator, n=1)
    fixed = fixed * 0.5 + 0.25
    with torch.inference_mode():
        out = model(moving, fixed)
    inside = (..., slice(None), slice(None, 56))  # x + 6.3 < 63: the warped moving image has data
    assert out.valid[inside].min().item() == 1.0
    maximum = torch.maximum(out.warped, fixed)
    assert (maximum != fixed)[inside].float().mean().item() > 0.2  # the maximum takes both images
    expected = maximum.clamp(1e-3, 1 - 1e-3)  # the anchor's logit is taken within [eps, 1 - eps]
    assert (expected != maximum).any()
    torch.testing.assert_close(out.fused[inside], expected[inside], rtol=0, atol=1e-6)
    # a correction of +0.5 in logits everywhere: sigmoid(logit(max) + 0.5) = max e^0.5 / (1 - max + max e^0.5)
    with torch.no_grad():
        model.fuse.reconstruction.out.bias.fill_(0.5)
    with torch.inference_mode():
        corrected = model(moving, fixed).fused
    e = math.exp(0.5)
    hand = expected * e / (1 - expected + expected * e)
    torch.testing.assert_close(corrected[inside], hand[inside], rtol=0, atol=1e-5)
    # the correction learns: its conv gets gradients though it starts at zero
    model.train()
    model.fuse.reconstruction.out.bias.data.zero_()
    model(moving, fixed).fused.square().mean().backward()
    grad = model.fuse.reconstruction.out.weight.grad
    assert grad is not None and grad.abs().max().item() > 0


def test_bad_inputs_are_refused(small: BSAFusion) -> None:
    with pytest.raises(ValueError, match=r"inputs are 60x60 pixels; BSAFusion needs multiples of 16"):
        small(torch.zeros(1, 1, 60, 60), torch.zeros(1, 1, 60, 60))
    with pytest.raises(ValueError, match=r"moving is \(1, 1, 64, 64\) but fixed is \(1, 1, 32, 32\)"):
        small(torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"moving must have shape \(N, 1, H, W\), got \(1, 3, 64, 64\)"):
        small(torch.zeros(1, 3, 64, 64), torch.zeros(1, 1, 64, 64))


# checkpoints


def checkpoint_of(model: BSAFusion) -> dict[str, object]:
    return {"format": 1, "config": model.config.to_dict(), "state_dict": model.state_dict()}


def test_checkpoint_round_trip(small: BSAFusion, generator: torch.Generator, tmp_path: Path) -> None:
    moving, fixed = pair(generator)
    path = tmp_path / "model.pt"
    torch.save(checkpoint_of(small), path)
    with torch.inference_mode():
        expected = small(moving, fixed)
        for source in (checkpoint_of(small), read_checkpoint(path)):
            again = BSAFusion.from_checkpoint(source).eval()
            assert again.config == small.config
            for a, b in zip(again(moving, fixed)[:4], expected[:4], strict=True):
                assert torch.equal(a, b)


def test_half_precision_checkpoints_load_as_float32(small: BSAFusion, generator: torch.Generator) -> None:
    data = checkpoint_of(small)
    data["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in small.state_dict().items()}
    model = BSAFusion.from_checkpoint(data).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    moving, fixed = pair(generator)
    with torch.inference_mode():
        assert torch.allclose(model(moving, fixed).fused, small(moving, fixed).fused, atol=0.02)


def test_checkpoints_that_do_not_fit_say_so(small: BSAFusion) -> None:
    data = checkpoint_of(small)
    with pytest.raises(ValueError, match=r"does not fit its config: .*size mismatch"):
        BSAFusion.from_checkpoint({**data, "config": ModelConfig.paper().to_dict()})
    state = dict(small.state_dict())
    state.pop("fuse.reconstruction.out.bias")
    with pytest.raises(ValueError, match=r"does not fit its config: missing 1 tensors"):
        BSAFusion.from_checkpoint({**data, "state_dict": state})
    with pytest.raises(ValueError, match=r"no 'config' entry"):
        BSAFusion.from_checkpoint({"state_dict": state})


# learning


@pytest.mark.slow
def test_small_learns_to_register_a_shifted_harvard_pair(harvard: Path) -> None:
    from bsafuse.io import read_image

    def load(folder: str) -> torch.Tensor:
        pixels = read_image(harvard / "CT-MRI" / folder / "16003.png").pixels
        return F.interpolate(torch.from_numpy(pixels)[None, None], size=(SIZE, SIZE), mode="area")

    label, fixed = load("CT"), load("MRI")
    t = torch.tensor([3.0, -4.0]).view(1, 2, 1, 1)
    moving = warp(label, -t.expand(1, 2, SIZE, SIZE))  # the CT moved by (3, -4) px
    model = build(small_config()).train()
    # the paper's learning rate: at 1e-4 Adam moves a coarse step flow by ~1 px per step and
    # overshoots now and then on a single pair
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    inner = (..., slice(8, -8), slice(8, -8))
    errors = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one 64 px pair: too small to share, and immune to a busy CPU's waits
    try:
        for _ in range(50):
            out = model(moving, fixed)
            loss, _ = total_loss(out, moving=moving, fixed=fixed, label=label)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            errors.append((out.flow.detach() - t)[inner].abs().mean().item())
    finally:
        torch.set_num_threads(threads)
    assert errors[0] == pytest.approx(3.5, abs=0.1)  # |3| + |-4|, halved: a mean over x and y
    assert max(errors[-5:]) < 1.0, [round(e, 3) for e in errors[::5]]
    assert math.isfinite(loss.item())


# GPU


@pytest.mark.cuda
def test_bf16_autocast_on_cuda_is_finite_and_keeps_flows_fp32(generator: torch.Generator) -> None:
    model = build(small_config()).cuda().train()
    moving, fixed = (x.cuda() for x in pair(generator))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(moving, fixed)
        loss, _ = total_loss(out, moving=moving, fixed=fixed, label=moving)
    loss.backward()
    assert out.flow.dtype == torch.float32 and all(f.dtype == torch.float32 for f in out.flows_moving)
    assert all(torch.isfinite(t.float()).all() for t in (out.fused, out.flow, out.warped, loss))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.cuda
def test_cpu_and_cuda_agree(small: BSAFusion, generator: torch.Generator) -> None:
    moving, fixed = pair(generator)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        gpu = build(small_config()).cuda().eval()
        with torch.inference_mode():
            on_gpu = gpu(moving.cuda(), fixed.cuda())
            on_cpu = small(moving, fixed)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    for a, b in zip(on_cpu[:4], on_gpu[:4], strict=True):
        assert torch.allclose(a, b.cpu(), atol=1e-4)
