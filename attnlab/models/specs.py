"""Typed specs of the attention blocks a backbone is assembled from, resolved once from a ModelConfig.

A backbone never reads the config to decide what a block contains; it asks these functions, which
are the one place where techniques (issue: architectural techniques, levels 1-4) change a block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from attnlab.errors import ConfigError
from attnlab.models.config import ModelConfig

Modulation = Literal["none", "adaln_zero"]
MIXERS = ("global",)  # self-attention kinds the blocks can build

# Architectural techniques the backbones implement: registry name -> backbones that take it.
SUPPORTED_TECHNIQUES: dict[str, tuple[str, ...]] = {}


@dataclass(frozen=True)
class AttnSpec:
    """One transformer block over tokens: its sub-layers and how the conditioning vector enters.

    Attributes:
        heads: attention heads.
        self_attn: a self-attention sub-layer (named "self").
        cross_attn: a cross-attention sub-layer to the condition tokens (named "cross").
        mlp_ratio: MLP hidden width over token width; 0 means no MLP sub-layer.
        modulation: "none": pre-norm sub-layers with learned affine norms, output projections
            zero-initialised (ADM); the timestep enters elsewhere. "adaln_zero": shift, scale and
            gate of every sub-layer regressed from the conditioning vector, zero at init (DiT).
        mixer: the self-attention kind, one of MIXERS ("global": full softmax attention).
    """

    heads: int
    self_attn: bool = True
    cross_attn: bool = False
    mlp_ratio: float = 0.0
    modulation: Modulation = "none"
    mixer: str = "global"

    def sublayers(self) -> tuple[str, ...]:
        """Sub-layer names in the order they run."""
        return tuple(
            n
            for n, on in (("self", self.self_attn), ("cross", self.cross_attn), ("mlp", self.mlp_ratio > 0))
            if on
        )


def unet_attn_spec(cfg: ModelConfig, size: int | None) -> AttnSpec | None:
    """The attention block of a U-Net level with feature size `size` (None: the middle block), or None."""
    on = cfg.mid_attention if size is None else size in cfg.attn_resolutions
    if not on:
        return None
    return AttnSpec(heads=cfg.heads, cross_attn=cfg.cond == "text", mlp_ratio=cfg.block_mlp_ratio())


def dit_block_specs(cfg: ModelConfig) -> list[AttnSpec]:
    """One spec per DiT block, in order."""
    spec = AttnSpec(
        heads=cfg.heads,
        cross_attn=cfg.cond == "text",
        mlp_ratio=cfg.block_mlp_ratio(),
        modulation="adaln_zero",
    )
    return [spec] * cfg.depth


def check_techniques(cfg: ModelConfig) -> None:
    """Every technique in the config must be one this backbone implements (no silent no-ops)."""
    for name in cfg.techniques:
        backbones = SUPPORTED_TECHNIQUES.get(name, ())
        if cfg.backbone not in backbones:
            known = [n for n, b in SUPPORTED_TECHNIQUES.items() if cfg.backbone in b]
            raise ConfigError(
                f"model.techniques.{name} is not an architectural technique of the {cfg.backbone} backbone; "
                f"available: {', '.join(known) or 'none'}"
            )
