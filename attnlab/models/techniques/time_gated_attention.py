"""Time-gated attention: each attention residual is scaled by a gate regressed from the timestep
embedding, x + g(t) * attn(norm(x)), so a block can lean on attention at some noise levels and not
at others (the gate of adaLN-Zero, DiT: Peebles & Xie 2023, arXiv:2212.09748, applied to attention
alone and to blocks without adaLN)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor, nn

from attnlab.errors import ConfigError
from attnlab.models.specs import AttnSpec, Where
from attnlab.models.techniques.scope import Scope
from attnlab.techniques import register


class TimeGate(nn.Module):
    """Conditioning vector (B, emb_dim) -> one gate (B, 1, dim) per attention sub-layer, 1 at init.

    The vector is the backbone's time embedding (plus the class or pooled text vector when the model
    is conditioned, since the backbone sums them before the blocks).

    Args:
        emb_dim: width of the conditioning vector.
        dim: token width.
        names: the gated sub-layers ("self", "chan", "cross").
    """

    def __init__(self, emb_dim: int, dim: int, names: tuple[str, ...]):
        super().__init__()
        self.names = names
        self.proj = nn.Linear(emb_dim, len(names) * dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero regression: every gate is exactly 1, so a new block equals its ungated self."""
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, emb: Tensor) -> dict[str, Tensor]:
        gates = (1.0 + self.proj(emb))[:, None].chunk(len(self.names), dim=-1)  # n x (B, 1, dim)
        return dict(zip(self.names, gates))


@register(
    "time_gated_attention",
    level=3,
    paper="gated residuals of adaLN-Zero (DiT, Peebles & Xie, 2023, arXiv:2212.09748), on attention alone",
    training_free=False,
    provides=("check", "edit_spec"),
    summary=(
        "attention residuals scaled by a learned function of the timestep (1 at init): lets blocks "
        "switch attention by noise level; one emb_dim x dim linear per attention sub-layer"
    ),
    modalities=(1, 2, "tokens", "points"),
)
@dataclass
class TimeGatedAttention:
    """A time gate on every attention sub-layer of the selected blocks.

    Args:
        resolutions: U-Net feature sizes whose attention blocks get it (None: all of them).
        blocks: DiT block indices that get it (None: every block).
    """

    resolutions: tuple[int, ...] | None = None
    blocks: tuple[int, ...] | None = None

    def __post_init__(self):
        self.scope = Scope("time_gated_attention", self.resolutions, self.blocks)

    def check(self, cfg) -> None:
        self.scope.check(cfg)
        if cfg.techniques.get("time_embedding", {}).get("mode") == "none":
            raise ConfigError(
                "model.techniques.time_gated_attention gates by the timestep, which "
                "time_embedding mode=none takes out of the model; drop one of them"
            )

    def edit_spec(self, spec: AttnSpec, where: Where) -> AttnSpec:
        return dataclasses.replace(spec, time_gate=TimeGate) if self.scope.contains(where) else spec
