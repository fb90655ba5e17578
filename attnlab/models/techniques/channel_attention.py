"""Channel attention as cross-covariance attention (XCA, XCiT: El-Nouby et al. 2021, arXiv:2106.09681):
softmax attention between the channels of each head, not between tokens, so the map is d x d and the
cost grows linearly with the number of tokens. Added as its own sub-layer after self-attention."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.models.specs import AttnSpec, Where
from attnlab.models.techniques.scope import Scope
from attnlab.techniques import register


class ChannelAttention(nn.Module):
    """XCA: per head, A = softmax(tau * q_hat^T k_hat) over channels (d x d), out = A v.

    q and k are L2-normalised along the tokens, so each entry of A is a cosine between two channels'
    token profiles; tau is a learned temperature per head. Every output channel is a convex mix of
    the value channels of its own token: tokens do not exchange information here, only channels
    (through statistics of all tokens). Not an `Attention` layer: its map is over channels, so the
    token-map controls of the bus (guidance, heat maps) do not apply to it.

    Args:
        dim: token width.
        heads: heads (dim must be divisible by it).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.to_out = nn.Linear(dim, dim)

    def channel_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(A (B, heads, d, d) with rows summing to 1, v (B, heads, d, N)) for tokens x (B, N, dim)."""
        b, n, c = x.shape
        qkv = self.to_qkv(x).view(b, n, 3, self.heads, c // self.heads)  # (B, N, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 4, 1)  # 3 x (B, heads, d, N): channels as the sequence
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)  # unit token profile per channel
        return (self.temperature * (q @ k.transpose(-2, -1))).softmax(dim=-1), v

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, dim) -> (B, N, dim)."""
        b, n, c = x.shape
        a, v = self.channel_map(x)
        out = (a @ v).permute(0, 3, 1, 2).reshape(b, n, c)  # (B, heads, d, N) -> (B, N, heads * d)
        return self.to_out(out)


@register(
    "channel_attention",
    level=2,
    paper="XCiT: cross-covariance attention (El-Nouby et al., 2021, arXiv:2106.09681)",
    training_free=False,
    provides=("check", "edit_spec"),
    summary=(
        "an extra sub-layer attending across channels (d x d map per head) after self-attention: "
        "global feature recalibration at O(N d^2); adds 4 dim^2 parameters per block"
    ),
    modalities=(1, 2, "tokens", "points"),
)
@dataclass
class ChannelAttentionTechnique:
    """A channel-attention sub-layer ("chan") in the selected transformer blocks.

    Args:
        resolutions: U-Net feature sizes whose attention blocks get it (None: all of them).
        blocks: DiT block indices that get it (None: every block).
    """

    resolutions: tuple[int, ...] | None = None
    blocks: tuple[int, ...] | None = None

    def __post_init__(self):
        self.scope = Scope("channel_attention", self.resolutions, self.blocks)

    def check(self, cfg) -> None:
        self.scope.check(cfg)

    def edit_spec(self, spec: AttnSpec, where: Where) -> AttnSpec:
        if not self.scope.contains(where):
            return spec
        return dataclasses.replace(spec, channel_attn=ChannelAttention)
