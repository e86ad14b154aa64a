"""Configuration of the BSAFusion network and of its loss weights.

`ModelConfig` nests one frozen dataclass per sub-network (MDF-FR encoder, BSFA alignment, MMFF
fusion). Every value is checked in ``__post_init__`` (ValueError), and the whole config travels
in each checkpoint as ``to_dict()``, so ``BSAFusion.from_checkpoint`` can rebuild the network.

Presets:
    ``ModelConfig.paper()``: the sizes of the authors' implementation (design.md §2a): 9,878,122
    parameters, all counted (9,019,752 trained, 858,370 in the frozen copy of the modality
    classifier; the learned positional map included; no buffers), 27.0 GFLOPs per 256 x 256 pair.
    ``ModelConfig.small()``: the same structure with fewer channels, heads and a shorter token,
    for CPU training and tests.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from bsafuse.typed_dicts import build, plain


def _positive(owner: str, **values: int | float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{owner}.{name} must be positive, got {value}")


def _divisible(owner: str, channels: tuple[int, ...], heads: tuple[int, ...], what: str) -> None:
    if len(channels) != len(heads):
        raise ValueError(f"{owner}: {what} has {len(channels)} channel counts but {len(heads)} head counts")
    for c, h in zip(channels, heads, strict=True):
        if h <= 0 or c % h:
            raise ValueError(f"{owner}: {what} channels ({c}) must be divisible by heads ({h})")


@dataclass(frozen=True)
class EncoderConfig:
    """MDF-FR: shared encoder, modality head (MFRH) and the Transfer blocks."""

    shallow_channels: int = 8  # C of F'_A, F'_B (Restormer layer 1, full resolution)
    shallow_heads: int = 1
    token_channels: int = 3  # channels of Restormer layer 2, fed to the tokeniser
    token_heads: int = 1
    dim: int = 256  # W' in the paper: length of a token
    heads: int = 4  # attention heads of the Transformer layers
    mlp_dim: int = 256  # hidden width of the Transformer MLPs
    depth: int = 2  # Transformer layers of the shared encoder
    transfer_depth: int = 2  # Transformer layers of TransferA and of TransferB each
    classifier_dim: int = 256  # hidden width of the modality MLP (dim -> classifier_dim -> 2)

    def __post_init__(self) -> None:
        _positive(
            "EncoderConfig",
            shallow_channels=self.shallow_channels,
            token_channels=self.token_channels,
            dim=self.dim,
            heads=self.heads,
            mlp_dim=self.mlp_dim,
            depth=self.depth,
            transfer_depth=self.transfer_depth,
            classifier_dim=self.classifier_dim,
        )
        if self.dim % self.heads:
            raise ValueError(f"EncoderConfig: dim ({self.dim}) must be divisible by heads ({self.heads})")
        _divisible("EncoderConfig", (self.shallow_channels,), (self.shallow_heads,), "shallow Restormer")
        _divisible("EncoderConfig", (self.token_channels,), (self.token_heads,), "token Restormer")


@dataclass(frozen=True)
class AlignConfig:
    """BSFA: K registration steps per direction, coarse to fine (step i at H / 2**(K-1-i))."""

    channels: tuple[int, ...] = (256, 64, 32, 16, 8)  # feature channels of each step
    max_step: float = 1.0  # tanh bound of a step flow, in pixels of that step's scale

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        if len(self.channels) < 2:
            raise ValueError(f"AlignConfig: needs at least 2 steps, got channels={self.channels}")
        for c in self.channels:
            if c <= 0:
                raise ValueError(f"AlignConfig: channels must be positive, got {self.channels}")
        _positive("AlignConfig", max_step=self.max_step)

    @property
    def steps(self) -> int:
        """K, the number of registration steps per direction."""
        return len(self.channels)


@dataclass(frozen=True)
class FuseConfig:
    """MMFF: one FusionBlock per step but the finest, then the reconstruction."""

    channels: tuple[int, ...] = (64, 32, 16, 12)  # output channels of FusionBlock 1..K-1
    heads: tuple[int, ...] = (4, 2, 1, 1)
    reconstruction_heads: int = 1
    # "none": the paper's reconstruction, sigmoid(conv(...)). "max" (not in the paper; design.md §2):
    # the reconstruction learns a correction of the aligned pair's pixel maximum, in logits,
    # sigmoid(conv(...) + logit(max(W(I_A, phi), I_B))), its last conv starting at zero.
    anchor: Literal["none", "max"] = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "heads", tuple(self.heads))
        if self.anchor not in ("none", "max"):
            raise ValueError(f"FuseConfig.anchor must be 'none' or 'max', got {self.anchor!r}")
        _divisible("FuseConfig", self.channels, self.heads, "fusion block")
        _divisible("FuseConfig", (self.channels[-1],), (self.reconstruction_heads,), "reconstruction")


@dataclass(frozen=True)
class ModelConfig:
    """The whole network. Inputs must be multiples of ``2**(K-1)`` pixels on each side."""

    image_size: int = 256  # working size the model is built for (the learned positional map)
    ffn_expansion: int = 4  # GDFN hidden width = ffn_expansion * C in every Restormer block
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)

    def __post_init__(self) -> None:
        for name, sub, kind in (
            ("encoder", self.encoder, EncoderConfig),
            ("align", self.align, AlignConfig),
            ("fuse", self.fuse, FuseConfig),
        ):
            if not isinstance(sub, kind):
                raise ValueError(f"ModelConfig.{name} must be a {kind.__name__}, got {type(sub).__name__}")
        _positive("ModelConfig", image_size=self.image_size, ffn_expansion=self.ffn_expansion)
        stride = self.stride
        if self.image_size % stride:
            raise ValueError(f"ModelConfig: image_size ({self.image_size}) must be a multiple of {stride}")
        if self.align.channels[0] != self.encoder.dim:
            raise ValueError(
                f"ModelConfig: align.channels[0] ({self.align.channels[0]}) must equal encoder.dim "
                f"({self.encoder.dim}): the first step works on the token maps"
            )
        if len(self.fuse.channels) != self.align.steps - 1:
            raise ValueError(
                f"ModelConfig: fuse.channels needs K - 1 = {self.align.steps - 1} entries "
                f"(one FusionBlock per step but the finest), got {len(self.fuse.channels)}"
            )

    @property
    def stride(self) -> int:
        """Inputs must be multiples of this many pixels (2**(K-1)); also the side of the square
        patch behind one token, so that the tokens sit at the coarsest registration step."""
        return 2 ** (self.align.steps - 1)

    @classmethod
    def paper(cls) -> ModelConfig:
        """The sizes of the authors' implementation (design.md §2a)."""
        return cls()

    @classmethod
    def small(cls) -> ModelConfig:
        """Same structure, fewer channels and heads, 64-long tokens: trains on a CPU (0.96 M parameters)."""
        return cls(
            image_size=256,
            ffn_expansion=2,
            encoder=EncoderConfig(
                shallow_channels=4,
                token_channels=3,
                dim=64,
                heads=2,
                mlp_dim=64,
                depth=2,
                transfer_depth=2,
                classifier_dim=64,
            ),
            align=AlignConfig(channels=(64, 32, 16, 8, 4)),
            fuse=FuseConfig(channels=(32, 16, 8, 6), heads=(2, 1, 1, 1)),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, not tuples), safe for checkpoints and JSON."""
        result: dict[str, Any] = plain(self)
        return result

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown or mistyped keys raise ValueError (an InputError).

        Checkpoints written before the patch size was derived carry ``encoder.patch``; it is
        accepted where it equals the derived `stride` (it always did: the config refused others).
        """
        encoder = data.get("encoder") if isinstance(data, dict) else None
        if isinstance(encoder, dict) and "patch" in encoder:
            encoder = {k: v for k, v in encoder.items() if k != "patch"}
            config = build(cls, {**data, "encoder": encoder}, where="config")
            if data["encoder"]["patch"] != config.stride:
                raise ValueError(
                    f"config.encoder.patch ({data['encoder']['patch']}) must equal 2**(K-1) = {config.stride}"
                )
            return config
        return build(cls, data, where="config")


@dataclass(frozen=True)
class LossWeights:
    """Weights of Eq. 14 (L_total) and of the per-step smoothness terms (Eq. 8).

    ``smooth_steps[i]`` weighs step i's flows (coarse to fine, both directions), each in pixels of
    its own scale; ``smooth_total`` weighs the total flow phi at full resolution. The step weights
    grow tenfold per finer step, as in the authors' implementation: a coarse step pixel is many
    image pixels, and its field is smoothed by the upsampling anyway.
    """

    ce1: float = 1.0
    ce2: float = 1.0
    consis: float = 1.0
    smooth: float = 1.0
    struct: float = 1.0
    grad: float = 1.0
    inten: float = 0.5  # lambda in Eq. 14
    smooth_steps: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    smooth_total: float = 1.0
    # Not in the paper: an end-point term |phi - phi_true|_1 (pixels) on the ground-truth flow that
    # the on-the-fly misalignment provides. 0 is the paper's recipe; bsafuse's quick CPU recipe
    # uses it, because the unsupervised terms alone barely move the flow in a CPU-sized budget.
    flow: float = 0.0
    # Not in the paper: the same supervision at every BSFA step (losses.step_endpoint_loss): the
    # flow after step i against the true flow at step i's scale, pixels, averaged over the steps.
    flow_scales: float = 0.0
    # Not in the paper: a Q_CV term (metric_losses.cv_loss, in [0, 1] units, ~0.015 for a good CT fusion)
    # on the fused image, block by block towards the source with the stronger edges. 0: off.
    cv: float = 0.0
    # Not in the paper: a Q_AB/F term (metric_losses.qabf_loss = 1 - Q_AB/F, ~0.25 for a good PET fusion)
    # that asks the fused image to keep each source's edges in strength and orientation. 0: off.
    abf: float = 0.0
    # Not in the paper: a Q_VIF term (metric_losses.vif_loss = 1 - Q_VIF, ~0.55 for a good PET fusion)
    # that asks the fused image to keep each source's local contrast as information. 0: off.
    vif: float = 0.0
    # Not in the paper: the share s of the aligned truth (the label) in what the fusion terms judge
    # the fused image against, (1 - s) W(A, phi) + s A. 0: the paper's W(A, phi). With the
    # registration frozen, 1 asks the fusion for what perfect alignment would have given, as the
    # fusion metrics do (they score against A).
    label_target: float = 0.0
    # mu of Eq. 11 (the weight of SSIM(F, B) against SSIM(F, W(A))). None: the paper's rule, set
    # each epoch to the ratio of the two SSIMs (losses.update_mu), which favours the image the
    # fused one already resembles (the MRI: mu settles near 2); a number: that mu for every epoch.
    mu: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "smooth_steps", tuple(float(w) for w in self.smooth_steps))
        if self.mu is not None and not (math.isfinite(self.mu) and self.mu > 0):
            raise ValueError(f"LossWeights.mu must be a positive number (or unset), got {self.mu}")
        for name in (f.name for f in dataclasses.fields(self) if f.name not in ("smooth_steps", "mu")):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"LossWeights.{name} must be >= 0, got {value}")
        if self.label_target > 1:
            raise ValueError(f"LossWeights.label_target is a share in [0, 1], got {self.label_target}")
        if any(w < 0 for w in self.smooth_steps):
            raise ValueError(f"LossWeights.smooth_steps must be >= 0, got {self.smooth_steps}")
