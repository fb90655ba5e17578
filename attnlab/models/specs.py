"""Typed specs of the attention blocks a backbone is assembled from, resolved once from a ModelConfig.

A backbone never reads the config to decide what a block contains; it asks these functions, which
are the one place where techniques (issue: architectural techniques, levels 1-4) change a block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from attnlab.attention.core import AttnKernel
from attnlab.errors import ConfigError
from attnlab.models.config import ModelConfig
from attnlab.techniques.registry import get

Modulation = Literal["none", "adaln_zero"]

# Architectural techniques the backbones implement: registry name -> backbones that take it.
SUPPORTED_TECHNIQUES: dict[str, tuple[str, ...]] = {
    # L1 input
    "abs_pos": ("unet", "dit"),
    "rope": ("unet", "dit"),
    "in_context": ("dit",),
    "mask_cond": ("unet", "dit"),
    "tome": ("unet", "dit"),  # also a sampling-time control (training_free in the registry)
    # L2 internal
    "attn_placement": ("unet", "dit"),
    "cross_attention": ("unet", "dit"),
    "linear_attention": ("unet", "dit"),
    "window_attention": ("unet", "dit"),
    "channel_attention": ("unet", "dit"),
    # L3 time
    "time_embedding": ("unet", "dit"),
    "time_gated_attention": ("unet", "dit"),
    # L4 cross-scale
    "attention_gate": ("unet",),
    "long_skips": ("dit",),
    "cross_scale_attention": ("unet",),
}


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
        mixer: the self-attention kernel (linear, windowed); None is softmax over all tokens (SDPA).
        channel_attn: factory (dim, heads) -> module of a channel-attention sub-layer (named "chan",
            after self-attention); None: no such sub-layer.
        time_gate: factory (emb_dim, dim, sub-layer names) -> module mapping the conditioning vector
            to a gate per attention sub-layer, which scales its residual; None: no gate.
        rotary: factory (dim, heads) -> the self-attention's rotary position module (RoPE); None: none.
    """

    heads: int
    self_attn: bool = True
    cross_attn: bool = False
    mlp_ratio: float = 0.0
    modulation: Modulation = "none"
    mixer: AttnKernel | None = None
    channel_attn: Callable[[int, int], nn.Module] | None = None
    time_gate: Callable[[int, int, tuple[str, ...]], nn.Module] | None = None
    rotary: Callable[[int, int], nn.Module] | None = None

    def sublayers(self) -> tuple[str, ...]:
        """Sub-layer names in the order they run."""
        on = {
            "self": self.self_attn,
            "chan": self.channel_attn is not None,
            "cross": self.cross_attn,
            "mlp": self.mlp_ratio > 0,
        }
        return tuple(n for n, o in on.items() if o)


@dataclass(frozen=True)
class Where:
    """Where a block sits, for techniques that change some blocks only.

    Attributes:
        side: U-Net "down", "mid" or "up"; DiT "block".
        size: U-Net feature size of the block (H, or T for audio); None in a DiT.
        index: DiT block index (0-based); None in a U-Net.
    """

    side: Literal["down", "mid", "up", "block"]
    size: int | None = None
    index: int | None = None


def built_techniques(cfg: ModelConfig) -> dict[str, Any]:
    """The config's architectural techniques as their registered option objects, by name."""
    out = {}
    for name, options in cfg.techniques.items():
        try:
            out[name] = get(name).build(**options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.techniques.{name}: {e}") from None
    return out


def _edited(cfg: ModelConfig, spec: AttnSpec, where: Where) -> AttnSpec:
    """The spec after every technique with an `edit_spec(spec, where)` hook, in config order."""
    for tech in built_techniques(cfg).values():
        edit = getattr(tech, "edit_spec", None)
        spec = spec if edit is None else edit(spec, where)
    return spec


def unet_attn_spec(cfg: ModelConfig, size: int | None, side: str | None = None) -> AttnSpec | None:
    """The attention block of a U-Net block, or None.

    Args:
        size: the block's feature size; None is the middle block.
        side: "down" or "up" (None: "down", or "mid" when size is None).
    """
    side = side or ("mid" if size is None else "down")
    on = cfg.mid_attention if side == "mid" else size in cfg.attn_resolutions
    if not on:
        return None
    spec = AttnSpec(heads=cfg.heads, cross_attn=cfg.cond == "text", mlp_ratio=cfg.block_mlp_ratio())
    where = Where(side, cfg.feature_sizes()[-1] if side == "mid" else size)
    spec = _edited(cfg, spec, where)
    return spec if spec.sublayers() else None


def dit_block_specs(cfg: ModelConfig) -> list[AttnSpec]:
    """One spec per DiT block, in order."""
    spec = AttnSpec(
        heads=cfg.heads,
        cross_attn=cfg.cond == "text",
        mlp_ratio=cfg.block_mlp_ratio(),
        modulation="adaln_zero",
    )
    return [_edited(cfg, spec, Where("block", index=i)) for i in range(cfg.depth)]


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
    for tech in built_techniques(cfg).values():
        check = getattr(tech, "check", None)
        if check is not None:
            check(cfg)  # options that depend on the model (feature sizes, block indices, cond)
