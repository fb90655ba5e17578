"""Absolute position tables added to the tokens attention sees: fixed sin-cos (Vaswani et al. 2017,
arXiv:1706.03762; 2D as in MAE/DiT) or learned (ViT, Dosovitskiy et al. 2021, arXiv:2010.11929; U-ViT).

A DiT already adds the fixed table to its patch tokens; `learned` makes that table a parameter. A
U-Net has no positions (its convolutions know where they are); here each attention block adds a
table to the input of its self-attention, so attention can tell tokens of equal content apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from attnlab.errors import ConfigError
from attnlab.models.embeddings import sincos_pos_embed
from attnlab.techniques import register

KINDS = ("sincos", "learned")


class PositionTable(nn.Module):
    """Adds a (1, N, dim) table, fixed (a buffer) or learned (a parameter), to (B, N, dim) tokens."""

    def __init__(self, table: Tensor):
        super().__init__()
        if isinstance(table, nn.Parameter):
            self.table = table
        else:
            self.register_buffer("table", table, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens + self.table


def position_table(kind: str, grid: tuple[int, ...], dim: int) -> Tensor:
    """(1, N, dim) fixed sin-cos positions of a row-major grid, as a Parameter when `learned`.

    A learned table starts at the sin-cos values, so it starts where the fixed one is.
    """
    table = sincos_pos_embed(tuple(grid), dim)[None]  # (1, N, dim)
    return nn.Parameter(table) if kind == "learned" else table


@register(
    "abs_pos",
    level=1,
    paper="Transformer sin-cos (Vaswani et al., 2017, arXiv:1706.03762); learned: ViT (Dosovitskiy et al., 2021, arXiv:2010.11929)",
    training_free=False,
    provides=("check", "unet_positions", "dit_positions"),
    modality_notes={
        "points": "a table indexed by token order; point tokens take Fourier features of their coordinates, and an index would break equivariance to the input order"
    },
    summary=(
        "absolute positions added to the tokens: DiT's table made learned, or a table for each U-Net "
        "attention block; N x width parameters (learned), one addition per block"
    ),
    modalities=(1, 2, "tokens"),
)
@dataclass
class AbsolutePositions:
    """Absolute position tables.

    Args:
        kind: "learned" (a parameter, initialised at the sin-cos values) or "sincos" (fixed). On a
            DiT, "sincos" is the backbone's own table (the base model).
    """

    kind: Literal["sincos", "learned"] = "learned"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(
                f"model.techniques.abs_pos.kind={self.kind!r} is not allowed: expected one of {', '.join(KINDS)}"
            )

    def check(self, cfg) -> None:
        step = 2 * cfg.dims  # a sin-cos table spends sin/cos pairs on each axis
        widths = [cfg.width] if cfg.backbone != "unet" else [cfg.width * m for m in cfg.channel_mult]
        bad = [w for w in widths if w % step]
        if bad:
            raise ConfigError(
                f"model.techniques.abs_pos needs token widths divisible by {step} for {cfg.dims}D data; got {bad[0]}"
            )
        if "rope" in cfg.techniques and cfg.backbone != "unet":
            raise ConfigError(
                "model.techniques: abs_pos and rope both set the DiT's positions; use rope.absolute=true "
                "to keep the sin-cos table with rope"
            )

    # Backbone hooks

    def dit_positions(self, grid: tuple[int, ...], dim: int) -> Tensor:
        """DiT: the table added to the patch tokens."""
        return position_table(self.kind, grid, dim)

    def unet_positions(self, grid: tuple[int, ...], dim: int) -> PositionTable:
        """U-Net: the table an attention block adds to its tokens."""
        return PositionTable(position_table(self.kind, grid, dim))
