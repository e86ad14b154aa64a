"""BSAFusion: MDF-FR encoder -> BSFA alignment -> MMFF fusion, in one network.

A = moving (CT/PET/SPECT), B = fixed (MRI). ``model(moving, fixed)`` returns a `FusionOutput`
whose images live in the fixed image's pixel grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from bsafuse._checks import check_shape
from bsafuse.choices import PREALIGN_KINDS
from bsafuse.config import ModelConfig
from bsafuse.model.align import BidirectionalAlignment
from bsafuse.model.encoder import (
    FrozenModalityClassifier,
    SharedEncoder,
    TransferBlock,
    inject_modality,
    token_map,
)
from bsafuse.model.fuse import MultimodalFusion, feature_pyramid, fusion_anchor
from bsafuse.model.speed import channels_last_gradient
from bsafuse.warp import warp

if TYPE_CHECKING:
    from bsafuse.loading import Provenance


class FusionOutput(NamedTuple):
    """Everything one forward pass gives, always the same ten fields (losses.total_loss reads them).

    The transfer logits are None when the pass ran with ``transfer_scores=False`` (inference).
    """

    fused: Tensor  # (N, 1, H, W) in [0, 1]; the fixed image where the warped moving has no data
    flow: Tensor  # (N, 2, H, W) pixels, warps moving onto fixed
    warped: Tensor  # (N, 1, H, W) warp(moving, flow)
    valid: Tensor  # (N, 1, H, W) in [0, 1], warp(ones, flow): where moving data exists
    flows_moving: tuple[Tensor, ...]  # K step flows phi_A^i (N, 2, h_i, w_i), coarse to fine
    flows_fixed: tuple[Tensor, ...]  # K step flows phi_B^i
    logits_moving: Tensor  # (N, 2) encoder modality logits of A (L_ce1 target: class 1)
    logits_fixed: Tensor  # (N, 2) of B (class 0)
    logits_moving_transfer: Tensor | None  # (N, 2) frozen-classifier logits y'_A of A's transferred tokens (L_ce2)
    logits_fixed_transfer: Tensor | None  # (N, 2) of B's


class BSAFusion(nn.Module):
    """The BSAFusion network (Li et al., AAAI 2025); see design.md §2.

    Choices where the paper and the public code are silent or wrong (design.md §2a):
      - the classifier of Eq. 3 is a frozen copy of the encoder's Transformer layers and MLP ("we
        replicate the Transformer layer in the encoder and the MLP"); L_ce2 trains the Transfer
        blocks through it but never the classifier itself;
      - FusionBlock i fuses the pre-transfer token maps brought to its scale by the alignment's
        shared up-modules, so fusion adds no parameters beyond its blocks;
      - the reconstruction ends in a 3x3 conv to one channel (paper: "a Restormer, a
        convolutional layer, and a sigmoid"), not a one-channel Restormer block, whose channel
        attention would be a constant 1x1 softmax that never trains;
      - both images go through the shared encoder as one batch, and both sides' features
        through each up-module as one batch.
    Not in the paper, off unless the config asks for it: ``fuse.anchor = "max"``, the
    reconstruction as a correction of the aligned pair's pixel maximum (model/fuse.py).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = SharedEncoder(cfg)
        self.transfer_a = TransferBlock(cfg.encoder)
        self.transfer_b = TransferBlock(cfg.encoder)
        self.scorer = FrozenModalityClassifier(cfg)  # `scorer`: the checkpoint keys' name
        self.align = BidirectionalAlignment(cfg.align)
        self.fuse = MultimodalFusion(cfg)
        self.refresh_modality_scorer()
        self.provenance: Provenance | None = None  # where the weights came from (set by load_model)
        # The pipeline's STILL_PX for these weights (design.md §5), from the checkpoint's "still_px"
        # entry; None: the default, choices.STILL_PX. A calibration of trained weights, so a model
        # fine-tuned from them starts without it (`bsafuse weights export --still-px` sets it).
        self.still_px: float | None = None
        # The pre-alignment these weights were calibrated with, from the checkpoint's "prealign"
        # entry (`bsafuse weights export --prealign`); None: choices.DEFAULT_PREALIGN.
        self.prealign: str | None = None
        # NHWC weights: convolutions run without layout round trips (model/speed.py)
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (stubs lack it)

    def refresh_modality_scorer(self) -> None:
        """Copy the encoder's Transformer layers and MLP into the frozen classifier (each epoch)."""
        self.scorer.refresh(self.encoder)

    def forward(self, moving: Tensor, fixed: Tensor, *, transfer_scores: bool = True) -> FusionOutput:
        """moving, fixed: (N, 1, H, W) in [0, 1], H and W multiples of ``config.stride``.

        ``transfer_scores=False`` skips the frozen classifier of Eq. 3, whose logits only L_ce2
        reads (about 8 % of a forward pass): inference runs without it, training and validation with it.
        """
        self._check_inputs(moving, fixed)
        size = (moving.shape[-2], moving.shape[-1])
        enc = self.encoder(torch.cat((moving, fixed), dim=0))  # A rows, then B rows (it acts per sample)
        tokens_a, tokens_b = enc.tokens.chunk(2, dim=0)  # (N, 1 + P, dim)
        shallow_a, shallow_b = channels_last_gradient(enc.shallow).chunk(2, dim=0)
        logits_a, logits_b = enc.logits.chunk(2, dim=0)

        # Eqs. 2-3: inject the other image's MFRH, transfer, classify the result
        moved_a = self.transfer_a(inject_modality(tokens_a, tokens_b[:, 0]))
        moved_b = self.transfer_b(inject_modality(tokens_b, tokens_a[:, 0]))
        scores_a = scores_b = None
        if transfer_scores:
            scores_a, scores_b = self.scorer(torch.cat((moved_a, moved_b), dim=0)).chunk(2, dim=0)

        # Eqs. 4-7: stepwise flows from the transferred token maps
        grid = (size[0] // self.config.stride, size[1] // self.config.stride)
        alignment = self.align(token_map(moved_a, grid), token_map(moved_b, grid), size)
        flow = alignment.flow  # (N, 2, H, W) fp32

        # Eq. 10: fuse the features from before the transfer, at every step's scale
        pyramid = feature_pyramid(token_map(enc.tokens, grid), self.align.ups[:-1])  # A, B as one batch
        halves = (channels_last_gradient(level).chunk(2, dim=0) for level in pyramid)
        pyramid_a, pyramid_b = zip(*halves, strict=True)
        # W(I_A, phi) and W(1, phi) computed as one warp of both as channels; identical: per-channel sampling
        warped, valid = warp(torch.cat((moving, torch.ones_like(moving)), dim=1), flow).chunk(2, dim=1)
        valid = valid.clamp(0.0, 1.0)  # bilinear weights can sum to 1 + 1 ulp
        anchor = fusion_anchor(self.config.fuse, warped, fixed)
        fused = self.fuse(list(pyramid_a), list(pyramid_b), shallow_a, shallow_b, flow, anchor)
        fused = keep_fixed_outside(fused, fixed, valid)
        return FusionOutput(
            fused=fused,
            flow=flow,
            warped=warped,
            valid=valid,
            flows_moving=alignment.flows_a,
            flows_fixed=alignment.flows_b,
            logits_moving=logits_a,
            logits_fixed=logits_b,
            logits_moving_transfer=scores_a,
            logits_fixed_transfer=scores_b,
        )

    def _check_inputs(self, moving: Tensor, fixed: Tensor) -> None:
        check_shape(moving, "N 1 H W", name="moving")
        check_shape(fixed, "N 1 H W", name="fixed")
        if moving.shape != fixed.shape:
            raise ValueError(
                f"moving is {tuple(moving.shape)} but fixed is {tuple(fixed.shape)}; they must match"
            )
        stride = self.config.stride
        h, w = moving.shape[-2:]
        if h % stride or w % stride or h < stride or w < stride:
            raise ValueError(
                f"inputs are {h}x{w} pixels; BSAFusion needs multiples of {stride} "
                f"(pad or resize to the working size {self.config.image_size})"
            )

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> BSAFusion:
        """Rebuild a model from a checkpoint dict (as `bsafuse.weights.read_checkpoint` returns it).

        The dict holds ``config`` (ModelConfig.to_dict()) and ``state_dict``; half-precision
        weights are cast to float32. A config that does not fit the state dict raises ValueError
        (weights.py turns it into WeightsError). Files are read by `bsafuse.weights` (sha256,
        weights_only=True), never here; `bsafuse.load_model` is the way in for users.
        """
        missing = [key for key in ("config", "state_dict") if key not in checkpoint]
        if missing:
            raise ValueError(
                f"the checkpoint has no {' or '.join(repr(k) for k in missing)} entry; "
                f"it has {sorted(checkpoint)} (write checkpoints with bsafuse.weights.save_checkpoint)"
            )
        cfg = ModelConfig.from_dict(checkpoint["config"])
        state = {
            key: value.float() if torch.is_tensor(value) and value.is_floating_point() else value
            for key, value in checkpoint["state_dict"].items()
        }
        model = cls(cfg)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # tensor shapes that do not fit the config
            first = str(exc).strip().splitlines()[1:2] or [str(exc)]
            raise ValueError(
                f"the checkpoint's state dict does not fit its config: {first[0].strip()}"
            ) from None
        problems = []
        if result.missing_keys:
            problems.append(f"missing {len(result.missing_keys)} tensors (e.g. {result.missing_keys[0]})")
        if result.unexpected_keys:
            problems.append(
                f"{len(result.unexpected_keys)} unexpected tensors (e.g. {result.unexpected_keys[0]})"
            )
        if problems:
            raise ValueError(f"the checkpoint's state dict does not fit its config: {'; '.join(problems)}")
        model.still_px = checked_still_px(checkpoint.get("still_px"))
        model.prealign = checked_prealign(checkpoint.get("prealign"))
        return model


def checked_still_px(value: Any) -> float | None:
    """A checkpoint's "still_px" entry: None, or a positive number of pixels at REFERENCE_SIZE."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"the checkpoint's still_px must be a positive number of pixels, got {value!r}")
    return float(value)


def checked_prealign(value: Any) -> str | None:
    """A checkpoint's "prealign" entry: None, or one of choices.PREALIGN_KINDS."""
    if value is None:
        return None
    if value not in PREALIGN_KINDS:
        raise ValueError(f"the checkpoint's prealign must be one of {', '.join(PREALIGN_KINDS)}, got {value!r}")
    return str(value)


def keep_fixed_outside(fused: Tensor, fixed: Tensor, valid: Tensor) -> Tensor:
    """The fused image where the warped moving image has data, the fixed image where it has none.

    Where the flow samples outside the moving image the zeros read there would become a black
    wedge with a false edge (peer tools show them). `valid` = W(1, phi) in [0, 1] blends the two;
    it is detached, so it only switches the source and does not train the flow. fp32, also under
    autocast. Shapes: (N, 1, H, W) each.
    """
    mask = valid.detach()
    return mask * fused.float() + (1 - mask) * fixed.float()


@contextmanager
def identity_registration(model: nn.Module) -> Iterator[None]:
    """Within the block, the model's registration outputs the zero flow (MMFF fuses as given)."""
    align = getattr(model, "align", None)
    if align is None or not isinstance(align, torch.nn.Module):
        raise TypeError(f"{type(model).__name__} has no `align` module; is it a BSAFusion model?")

    def zero_flow(module: torch.nn.Module, args: Any, output: Any) -> Any:
        return output._replace(flow=torch.zeros_like(output.flow))

    handle = align.register_forward_hook(zero_flow)
    try:
        yield
    finally:
        handle.remove()
