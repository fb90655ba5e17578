"""Where self-attention sits: which DiT blocks, and which U-Net sides (encoder, middle, decoder) at the
attention resolutions. Global attention costs O(N^2) per layer, so where it pays off is a design
choice; the U-Net resolutions themselves are `model.attn_resolutions` and `model.mid_attention`
(ADM, Dhariwal & Nichol 2021, arXiv:2105.05233, studies them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from attnlab.errors import ConfigError
from attnlab.models.specs import AttnSpec, Where
from attnlab.models.techniques.scope import Scope
from attnlab.techniques import register


@register(
    "attn_placement",
    level=2,
    paper="ADM ablations of attention placement (Dhariwal & Nichol, 2021, arXiv:2105.05233)",
    training_free=False,
    provides=("check", "edit_spec"),
    summary=(
        "self-attention only in chosen DiT blocks or U-Net sides: fewer O(N^2) layers, less "
        "long-range mixing (a DiT block without it treats each patch alone)"
    ),
    modalities=(1, 2, "tokens", "points"),
)
@dataclass
class AttnPlacement:
    """Self-attention kept only where listed; other blocks keep their cross-attention and MLP.

    Args:
        blocks: DiT block indices that keep self-attention (None: all; [] none).
        down: U-Net encoder blocks at the attention resolutions keep self-attention.
        mid: U-Net middle block keeps self-attention (if `model.mid_attention`).
        up: U-Net decoder blocks at the attention resolutions keep self-attention.
    """

    blocks: tuple[int, ...] | None = None
    down: bool = True
    mid: bool = True
    up: bool = True

    def __post_init__(self):
        for key in ("down", "mid", "up"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(
                    f"model.techniques.attn_placement.{key}={getattr(self, key)!r} is not allowed: expected true or false"
                )
        self.scope = Scope("attn_placement", None, self.blocks)

    def check(self, cfg) -> None:
        self.scope.check(cfg)
        if cfg.backbone != "unet" and (False in (self.down, self.mid, self.up)):
            raise ConfigError(
                "model.techniques.attn_placement: down/mid/up are U-Net options; a DiT uses blocks"
            )

    def edit_spec(self, spec: AttnSpec, where: Where) -> AttnSpec:
        keep = self.scope.contains(where) if where.side == "block" else getattr(self, where.side)
        return spec if keep else dataclasses.replace(spec, self_attn=False)
