"""Attention gates on U-Net skip connections (Attention U-Net, Oktay et al. 2018, arXiv:1804.03999):
the decoder's features decide, position by position, how much of the encoder's skip map to let
through, alpha = sigmoid(psi(relu(W_s skip + W_g g))), before the two are concatenated."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.errors import ConfigError
from attnlab.models.blocks import conv_nd
from attnlab.models.techniques.scope import Scope
from attnlab.techniques import register


class AttentionGate(nn.Module):
    """Additive attention gate: one coefficient in (0, 1) per skip position.

    Oktay et al. compute the gate on the coarser gating grid and upsample it; here the decoder map
    already has the skip's size (it was upsampled before the block), so the gate is computed there.

    Args:
        skip_channels: channels of the encoder skip map.
        gate_channels: channels of the decoder map (the gating signal).
        inter: channels of the joint space.
        dims: 1 or 2 (see `attnlab.models.blocks`).
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter: int, dims: int):
        super().__init__()
        self.theta = conv_nd(dims, skip_channels, inter, 1)  # W_s, 1 x 1
        self.phi = conv_nd(dims, gate_channels, inter, 1)  # W_g, 1 x 1
        self.psi = conv_nd(dims, inter, 1, 1)

    def coefficients(self, skip: Tensor, g: Tensor) -> Tensor:
        """alpha (B, 1, H, W) in (0, 1)."""
        return torch.sigmoid(self.psi(F.relu(self.theta(skip) + self.phi(g))))

    def forward(self, skip: Tensor, g: Tensor) -> Tensor:
        """skip: (B, C_s, H, W) encoder map, g: (B, C_g, H, W) decoder map -> gated skip (B, C_s, H, W)."""
        return skip * self.coefficients(skip, g)


@register(
    "attention_gate",
    level=4,
    paper="Attention U-Net (Oktay et al., 2018, arXiv:1804.03999)",
    training_free=False,
    provides=("check", "skip_gate"),
    hosts=("unet",),
    summary=(
        "decoder features gate the encoder skip maps position by position: suppresses irrelevant "
        "skip detail; three 1x1 convolutions per gated skip"
    ),
    modality_notes={
        "points": "gates a U-Net's skip maps; the points backbone has no U-Net (long_skips are its skips)",
        "tokens": "gates a U-Net's skip maps; the tokens backbone has no U-Net (long_skips are its skips)",
    },
)
@dataclass
class AttentionGateTechnique:
    """Attention gates on the skips of the selected decoder levels.

    Args:
        resolutions: decoder feature sizes whose skips are gated (None: every level).
        inter: joint-space channels as a fraction of the skip's channels.
    """

    resolutions: tuple[int, ...] | None = None
    inter: float = 0.5

    def __post_init__(self):
        if not (isinstance(self.inter, (int, float)) and 0 < self.inter <= 4):
            raise ConfigError(
                f"model.techniques.attention_gate.inter={self.inter!r} is not allowed: expected a number in (0, 4]"
            )
        self.scope = Scope("attention_gate", self.resolutions, None)

    def check(self, cfg) -> None:
        self.scope.check(cfg)

    def skip_gate(self, cfg, size: int, skip_channels: int, gate_channels: int) -> AttentionGate | None:
        """U-Net: the gate of an up block at feature size `size`, or None."""
        if self.resolutions is not None and size not in self.resolutions:
            return None
        return AttentionGate(
            skip_channels, gate_channels, max(1, round(skip_channels * self.inter)), cfg.dims
        )
