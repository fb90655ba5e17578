"""Cross-attention to the text tokens on or off, per block (Latent Diffusion, Rombach et al. 2022,
arXiv:2112.10752). Without it a text-conditioned model sees the caption only as the pooled vector
added to the time embedding: cheaper, but word order and per-word placement are lost."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from attnlab.errors import ConfigError
from attnlab.models.specs import AttnSpec, Where
from attnlab.models.techniques.scope import Scope
from attnlab.techniques import register


@register(
    "cross_attention",
    level=2,
    paper="Latent Diffusion cross-attention conditioning (Rombach et al., 2022, arXiv:2112.10752)",
    training_free=False,
    provides=("check", "edit_spec"),
    summary=(
        "choose which blocks cross-attend to the text tokens (or none: pooled text only); each layer "
        "costs O(N L) and 4 dim^2 parameters"
    ),
    modalities=(1, 2, "tokens", "points"),
)
@dataclass
class CrossAttention:
    """Cross-attention kept only where selected (text-conditioned models).

    Args:
        enabled: false removes every cross-attention layer.
        resolutions: U-Net feature sizes that keep it (None: every attention block).
        blocks: DiT block indices that keep it (None: every block).
    """

    enabled: bool = True
    resolutions: tuple[int, ...] | None = None
    blocks: tuple[int, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ConfigError(
                f"model.techniques.cross_attention.enabled={self.enabled!r} is not allowed: expected true or false"
            )
        self.scope = Scope("cross_attention", self.resolutions, self.blocks)

    def check(self, cfg) -> None:
        if cfg.cond != "text":
            raise ConfigError(
                f"model.techniques.cross_attention needs model.cond=text (cross-attention reads text tokens), "
                f"got cond={cfg.cond!r}"
            )
        self.scope.check(cfg)

    def edit_spec(self, spec: AttnSpec, where: Where) -> AttnSpec:
        keep = self.enabled and self.scope.contains(where)
        return spec if keep else dataclasses.replace(spec, cross_attn=False)
