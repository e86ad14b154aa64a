"""The plain transcription of BSAFusion: every equation in its literal form, without the rewrites.

The model's forward methods compute the same functions through exact rewrites, each named by a
comment where it is used (and the op-level ones in model/speed.py). This module keeps the literal
forms, written as functions of a module's parameters, so that the rewrites can be checked
(tests/test_perf_equivalence.py: outputs within 1e-4) and timed (benchmarks' ``--reference``)
against the same weights in the same process. It patches nothing and holds no state:

    out = reference_forward(model, moving, fixed)  # the same FusionOutput as model(moving, fixed)

Each image goes through the shared modules on its own, as the paper writes it (the model runs A
and B as one batch). For the plain NCHW baseline, give it a copy of the model converted with
``.to(memory_format=torch.contiguous_format)``. A = moving, B = fixed.
"""

from __future__ import annotations

import functools
from typing import cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from bsafuse.model.align import (
    AlignmentOutput,
    BidirectionalAlignment,
    FeatureUp,
    RegistrationLayer,
    SpatialCrossAttention,
    total_flow,
    upsample2,
)
from bsafuse.model.blocks import ChannelAttention, GatedFeedForward, LayerNorm2d, RestormerBlock
from bsafuse.model.bsafusion import BSAFusion, FusionOutput, keep_fixed_outside
from bsafuse.model.encoder import EncodedPair, SharedEncoder, inject_modality, token_map
from bsafuse.model.fuse import FusionBlock, MultimodalFusion, anchored, feature_pyramid, fusion_anchor
from bsafuse.warp import resize_flow, warp


def channel_attention(module: ChannelAttention, x: Tensor) -> Tensor:
    """MDTA: softmax(q k^T * temperature) v per head, q and k L2-normalised over the pixels."""
    h, w = x.shape[-2:]
    qkv = module.qkv_spatial(module.qkv(x))  # the 1x1 conv, then the 3x3 conv
    q, k, v = rearrange(qkv, "n (three g c) h w -> three n g c (h w)", three=3, g=module.heads)
    q = F.normalize(q.float(), dim=-1)
    k = F.normalize(k.float(), dim=-1)
    attn = torch.softmax(q @ k.transpose(-2, -1) * module.temperature.float(), dim=-1)  # (n, g, c, c)
    out = attn.to(v.dtype) @ v  # (n, g, c, hw)
    return module.project(rearrange(out, "n g c (h w) -> n (g c) h w", h=h, w=w))


def gated_feed_forward(module: GatedFeedForward, x: Tensor) -> Tensor:
    """GDFN: GELU(a) * b of the two (1x1 conv, then 3x3 conv) branches, 1x1 back to C."""
    a, b = module.spatial(module.expand(x)).chunk(2, dim=1)
    return module.project(F.gelu(a) * b)


def layer_norm(module: LayerNorm2d, x: Tensor) -> Tensor:
    """LayerNorm over the channels of each pixel."""
    out = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], module.weight, module.bias, 1e-5)
    return out.permute(0, 3, 1, 2)


def restormer_block(module: RestormerBlock, x: Tensor) -> Tensor:
    """1x1 conv in -> out channels, then x + MDTA(LN(x)) and x + GDFN(LN(x))."""
    x = module.embed(x)
    x = x + channel_attention(module.attention, layer_norm(module.norm1, x))
    return x + gated_feed_forward(module.feed_forward, layer_norm(module.norm2, x))


def shared_encoder(module: SharedEncoder, image: Tensor) -> EncodedPair:
    """MDF-FR encoder of one image: F', then [f, F] and the MLP's y (Eq. 1)."""
    shallow = restormer_block(module.shallow, image)  # (N, C', H, W)
    deep = restormer_block(module.deep, shallow)
    deep = deep + module.positional_map(*deep.shape[-2:]).to(deep.dtype)
    patches = module.tokenise(deep)  # (N, P, dim)
    tokens = torch.cat((module.class_token.expand(len(patches), -1, -1).to(patches.dtype), patches), dim=1)
    for layer in module.layers:
        tokens = layer(tokens)  # (N, 1 + P, dim)
    return EncodedPair(shallow, tokens, module.classifier(tokens[:, 0]))


def attend(module: SpatialCrossAttention, x: Tensor, y: Tensor) -> Tensor:
    """x + x * gate, gate = softmax over positions of relu(conv(x)) * relu(conv(y)) over its peak."""
    score = F.relu(module.query(x)) * F.relu(module.key(y))  # (N, C, h, w)
    score = score.float()
    gate = torch.exp(score - score.amax(dim=(-2, -1), keepdim=True))
    return x + x * gate.to(x.dtype)


def spatial_cross_attention(module: SpatialCrossAttention, d: Tensor, f: Tensor) -> Tensor:
    return attend(module, d, f) + attend(module, f, d)


def registration_layer(
    module: RegistrationLayer, feat_a: Tensor, feat_b: Tensor, d: Tensor
) -> tuple[Tensor, Tensor | None]:
    """One FRL / RRL step (Eq. 6): {F_cn^i, D^(i-1)} -> (phi^i, D^i brought up x2)."""
    own, other = (feat_a, feat_b) if module.direction == "forward" else (feat_b, feat_a)
    f_cn = module.reduce(torch.cat((own, other), dim=1))
    x = spatial_cross_attention(module.attention, d, f_cn)
    x = x + F.leaky_relu(module.refine(x), 0.2)  # D^i
    flow = torch.tanh(module.flow_head(x).float()) * module.max_step
    if module.state_up is None:
        return flow, None
    return flow, module.state_up(upsample2(x))


def feature_up(module: FeatureUp, x: Tensor) -> Tensor:
    """Eq. 6's up2: bilinear x2, then the 1x1 conv, 3x3 conv, InstanceNorm and LeakyReLU in turn."""
    for layer in module:
        x = layer(x)
    return x


def bidirectional_alignment(
    module: BidirectionalAlignment, map_a: Tensor, map_b: Tensor, size: tuple[int, int]
) -> AlignmentOutput:
    """BSFA (Eqs. 6-7): phi = sum_i up(phi_A^i) - sum_i up(phi_B^i)."""
    frls = cast(list[RegistrationLayer], list(module.forward_layers))
    rrls = cast(list[RegistrationLayer], list(module.reverse_layers))
    ups = cast(list[FeatureUp], list(module.ups))
    feat_a, feat_b = map_a, map_b  # F_A^1, F_B^1
    d_a: Tensor | None = map_a  # D_A^0
    d_b: Tensor | None = map_b  # D_B^0
    flows_a: list[Tensor] = []
    flows_b: list[Tensor] = []
    for i, (frl, rrl) in enumerate(zip(frls, rrls, strict=True)):
        assert d_a is not None and d_b is not None  # None only after the last step
        flow_a, d_a = registration_layer(frl, feat_a, feat_b, d_a)
        flow_b, d_b = registration_layer(rrl, feat_a, feat_b, d_b)
        flows_a.append(flow_a)
        flows_b.append(flow_b)
        if i < len(ups):
            feat_a = feature_up(ups[i], warp(feat_a, flow_a))
            feat_b = feature_up(ups[i], warp(feat_b, flow_b))
    flow = total_flow(flows_a, size) - total_flow(flows_b, size)
    return AlignmentOutput(flow, tuple(flows_a), tuple(flows_b))


def multimodal_fusion(
    module: MultimodalFusion,
    pyramid_a: list[Tensor],
    pyramid_b: list[Tensor],
    shallow_a: Tensor,
    shallow_b: Tensor,
    flow: Tensor,
    anchor: Tensor | None = None,
) -> Tensor:
    """MMFF: G^i = up2(E_r(concat(W(F^_A^i, phi at that scale), F^_B^i, G^(i-1)))) (Eq. 10), then
    sigmoid(conv(Restormer(concat(G^J, F'_B, W(F'_A, phi)))) [+ logit(anchor)])."""
    g: Tensor | None = None
    blocks = cast(list[FusionBlock], list(module.blocks))
    for block, feat_a, feat_b in zip(blocks, pyramid_a, pyramid_b, strict=True):
        aligned_a = warp(feat_a, resize_flow(flow, (feat_a.shape[-2], feat_a.shape[-1]), antialias=True))
        parts = (aligned_a, feat_b) if g is None else (aligned_a, feat_b, g)
        g = upsample2(restormer_block(block.encode, torch.cat(parts, dim=1)))
    assert g is not None
    reconstruction = module.reconstruction
    x = torch.cat((g, shallow_b, warp(shallow_a, flow)), dim=1)
    return anchored(reconstruction.out(restormer_block(reconstruction.encode, x)), anchor)


def reference_forward(model: BSAFusion, moving: Tensor, fixed: Tensor) -> FusionOutput:
    """``model(moving, fixed)`` in the literal form of every equation (see the module docstring)."""
    model._check_inputs(moving, fixed)
    size = (moving.shape[-2], moving.shape[-1])
    enc_a, enc_b = shared_encoder(model.encoder, moving), shared_encoder(model.encoder, fixed)

    # Eqs. 2-3
    moved_a = model.transfer_a(inject_modality(enc_a.tokens, enc_b.tokens[:, 0]))
    moved_b = model.transfer_b(inject_modality(enc_b.tokens, enc_a.tokens[:, 0]))
    scores_a, scores_b = model.scorer(moved_a), model.scorer(moved_b)

    # Eqs. 4-7
    grid = (size[0] // model.config.stride, size[1] // model.config.stride)
    alignment = bidirectional_alignment(model.align, token_map(moved_a, grid), token_map(moved_b, grid), size)

    # Eq. 10
    ups = [functools.partial(feature_up, up) for up in cast(list[FeatureUp], list(model.align.ups))[:-1]]
    pyramid_a = feature_pyramid(token_map(enc_a.tokens, grid), ups)
    pyramid_b = feature_pyramid(token_map(enc_b.tokens, grid), ups)
    warped = warp(moving, alignment.flow)
    valid = warp(torch.ones_like(moving), alignment.flow).clamp(0.0, 1.0)
    anchor = fusion_anchor(model.config.fuse, warped, fixed)
    fused = multimodal_fusion(
        model.fuse, pyramid_a, pyramid_b, enc_a.shallow, enc_b.shallow, alignment.flow, anchor
    )
    return FusionOutput(
        fused=keep_fixed_outside(fused, fixed, valid),
        flow=alignment.flow,
        warped=warped,
        valid=valid,
        flows_moving=alignment.flows_a,
        flows_fixed=alignment.flows_b,
        logits_moving=enc_a.logits,
        logits_fixed=enc_b.logits,
        logits_moving_transfer=scores_a,
        logits_fixed_transfer=scores_b,
    )


class ReferenceForward(torch.nn.Module):
    """A model whose forward pass is `reference_forward` of `model` (for benchmarks' --reference)."""

    def __init__(self, model: BSAFusion) -> None:
        super().__init__()
        self.model = model

    def forward(self, moving: Tensor, fixed: Tensor) -> FusionOutput:
        return reference_forward(self.model, moving, fixed)
