"""MDF-FR: modality discrepancy-free feature representation (paper Eqs. 1-3).

A = moving (CT/PET/SPECT), B = fixed (MRI). One encoder is shared by A and B (both run as one
batch): Restormer layer 1 gives the shallow features F'_A, F'_B (sent straight to fusion);
Restormer layer 2, a learned positional map, a patch tokeniser and Transformer layers give the
patch tokens F_A, F_B plus the modality feature representation heads (MFRH) f_A, f_B: one
learned token per image at position 0, a class token in ViT terms. The MLP
`ModalityClassifier` predicts y_A, y_B from the MFRHs (Eq. 1, L_ce1). Eq. 2 adds the *other*
image's MFRH to every patch token; TransferA / TransferB (not shared) then remove what modality
is left, judged by a frozen copy of the encoder's Transformer layers and MLP (the
`FrozenModalityClassifier`, Eq. 3, L_ce2).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from bsafuse.config import EncoderConfig, ModelConfig
from bsafuse.model.blocks import PatchTokens, RestormerBlock, TransformerLayer


class ModalityClassifier(nn.Module):
    """The MLP behind the encoder: an MFRH f -> modality logits y, (N, dim) -> (N, 2) (Eq. 1)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 2))

    def forward(self, mfrh: Tensor) -> Tensor:
        return self.mlp(mfrh)


class EncodedPair(NamedTuple):
    """What the encoder gives for a stacked batch of images (A rows first, then B rows)."""

    shallow: Tensor  # (N, C', H, W)  F' of Restormer layer 1
    tokens: Tensor  # (N, 1 + P, dim)  the MFRH f at position 0, then the P patch tokens F
    logits: Tensor  # (N, 2)  modality logits y of the MFRH (Eq. 1)


class SharedEncoder(nn.Module):
    """The encoder both images go through (Restormer x2, tokens + MFRH, Transformer layers, MLP)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        enc = cfg.encoder
        self.shallow = RestormerBlock(
            1, enc.shallow_channels, heads=enc.shallow_heads, expansion=cfg.ffn_expansion
        )
        self.deep = RestormerBlock(
            enc.shallow_channels, enc.token_channels, heads=enc.token_heads, expansion=cfg.ffn_expansion
        )
        # learned positional map at the working size; resized for other input sizes
        self.position = nn.Parameter(torch.zeros(1, enc.token_channels, cfg.image_size, cfg.image_size))
        self.tokenise = PatchTokens(enc.token_channels, enc.dim, cfg.stride)
        self.class_token = nn.Parameter(torch.zeros(1, 1, enc.dim))  # the MFRH before the layers
        self.layers = nn.ModuleList(
            [TransformerLayer(enc.dim, heads=enc.heads, mlp_dim=enc.mlp_dim) for _ in range(enc.depth)]
        )
        self.classifier = ModalityClassifier(enc.dim, enc.classifier_dim)
        nn.init.trunc_normal_(self.position, std=0.02)
        nn.init.trunc_normal_(self.class_token, std=0.02)

    def positional_map(self, height: int, width: int) -> Tensor:
        if self.position.shape[-2:] == (height, width):
            return self.position
        return F.interpolate(self.position, size=(height, width), mode="bilinear", align_corners=False)

    def forward(self, images: Tensor) -> EncodedPair:
        shallow = self.shallow(images)  # (N, C', H, W)
        deep = self.deep(shallow)  # (N, 3, H, W)
        deep = deep + self.positional_map(*deep.shape[-2:]).to(deep.dtype)
        patches = self.tokenise(deep)  # (N, P, dim)
        mfrh = self.class_token.expand(len(patches), -1, -1).to(patches.dtype)  # (N, 1, dim)
        tokens = torch.cat((mfrh, patches), dim=1)
        for layer in self.layers:
            tokens = layer(tokens)  # (N, 1 + P, dim): [f, F]
        return EncodedPair(shallow, tokens, self.classifier(tokens[:, 0]))


def token_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """The reshaped patch tokens: (N, 1 + P, dim) -> (N, dim, h, w), the MFRH dropped; grid = (h, w)."""
    return rearrange(tokens[:, 1:], "n (h w) d -> n d h w", h=grid[0], w=grid[1])


def inject_modality(tokens: Tensor, other_mfrh: Tensor) -> Tensor:
    """Eq. 2: add the *other* image's MFRH to every patch token.

    tokens: (N, 1 + P, dim) with the image's own MFRH at position 0 (left as it is);
    other_mfrh: (N, dim). Returns (N, 1 + P, dim).
    """
    patches = tokens[:, 1:] + rearrange(other_mfrh, "n d -> n 1 d")
    return torch.cat((tokens[:, :1], patches), dim=1)


class TransferBlock(nn.Module):
    """TransferA / TransferB: Transformer layers on the Eq. 2 tokens of one image."""

    def __init__(self, enc: EncoderConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[
                TransformerLayer(enc.dim, heads=enc.heads, mlp_dim=enc.mlp_dim)
                for _ in range(enc.transfer_depth)
            ]
        )

    def forward(self, tokens: Tensor) -> Tensor:
        return self.layers(tokens)  # (N, 1 + P, dim)


class FrozenModalityClassifier(nn.Module):
    """The replicated Transformer layers and MLP that classify transferred tokens (Eq. 3): y'_A, y'_B.

    A frozen copy of the encoder's: its parameters never train, since L_ce2 must change the
    Transfer blocks, not the classifier that judges them. The trainer re-copies the encoder into it
    after every epoch (`refresh`), as the authors do.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        enc = cfg.encoder
        self.layers = nn.ModuleList(
            [TransformerLayer(enc.dim, heads=enc.heads, mlp_dim=enc.mlp_dim) for _ in range(enc.depth)]
        )
        self.classifier = ModalityClassifier(enc.dim, enc.classifier_dim)
        self.requires_grad_(False)

    @torch.no_grad()
    def refresh(self, encoder: SharedEncoder) -> None:
        self.layers.load_state_dict(encoder.layers.state_dict())
        self.classifier.load_state_dict(encoder.classifier.state_dict())
        self.requires_grad_(False)

    def forward(self, tokens: Tensor) -> Tensor:
        for layer in self.layers:
            tokens = layer(tokens)
        return self.classifier(tokens[:, 0])  # (N, 2), read at the MFRH's position 0
