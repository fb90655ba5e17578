"""Rotary position embedding (RoPE, Su et al. 2021, arXiv:2104.09864) in every self-attention layer:
queries and keys are rotated by angles proportional to their position, so each score depends on the
offset between two tokens, not on where they are. 1D for audio; axial 2D for images, half of each
head's rotation pairs turning with the row and half with the column (Heo et al. 2024, arXiv:2403.13298).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.errors import ConfigError
from attnlab.techniques import register


def rope_angles(grid: tuple[int, ...], head_dim: int, base: float) -> Tensor:
    """Rotation angle of every (token, pair): (prod(grid), head_dim // 2), row-major tokens.

    A k-D grid gives each axis head_dim // (2k) pairs with frequencies base^(-j / n_pairs_axis).
    """
    per_axis = head_dim // (2 * len(grid))
    freqs = base ** (-torch.arange(per_axis, dtype=torch.float32) / per_axis)  # (P,)
    coords = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in grid), indexing="ij")
    return torch.cat([c.flatten()[:, None] * freqs[None] for c in coords], dim=-1)  # (N, k * P)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Turn the pairs (x[..., i], x[..., i + d/2]) of x (B, heads, N, d) by the angles behind cos/sin (N, d/2)."""
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, heads, N, d/2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Rotary(nn.Module):
    """The rotation an Attention layer applies to q and k (see `Attention(rotary=...)`).

    Tokens past the grid (in-context condition tokens) carry no position: their angle is 0.

    Args:
        head_dim: width of one head (a multiple of 2 * the grid's dimensions).
        base: the largest period, in tokens; small grids want a small base (RoPE-ViT uses 100).
    """

    def __init__(self, head_dim: int, base: float = 100.0):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self._tables: dict = {}  # (grid, N, device, dtype) -> (cos, sin); a layer sees one or two

    def tables(self, grid: tuple[int, ...], n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (tuple(grid), n, like.device, like.dtype)
        if key not in self._tables:
            g = math.prod(grid)
            if n < g:
                raise ConfigError(
                    f"rope: {n} tokens for a grid of {g}: merged tokens have no position to rotate by"
                )
            angles = torch.zeros(n, self.head_dim // 2)
            angles[:g] = rope_angles(tuple(grid), self.head_dim, self.base)
            self._tables[key] = (angles.cos().to(like), angles.sin().to(like))
        return self._tables[key]

    def forward(self, q: Tensor, k: Tensor, grid: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """q, k: (B, heads, N, d) on `grid`; returns both rotated."""
        cos, sin = self.tables(grid, q.shape[2], q)
        return rotate(q, cos, sin), rotate(k, cos, sin)


@register(
    "rope",
    level=1,
    paper="RoFormer (Su et al., 2021, arXiv:2104.09864); 2D axial: RoPE-ViT (Heo et al., 2024, arXiv:2403.13298)",
    training_free=False,
    provides=("check", "edit_spec", "dit_positions"),
    modality_notes={
        "points": "rotates by token index; point tokens have no index order (their positions are Fourier features of the coordinates)"
    },
    summary=(
        "relative positions inside every self-attention (q, k rotated by position); DiT drops its "
        "absolute table; no parameters, a few elementwise ops per layer"
    ),
    modalities=(1, 2, "tokens"),
)
@dataclass
class RoPE:
    """Rotary positions in every self-attention layer.

    Args:
        base: the largest rotation period, in tokens.
        absolute: DiT only: keep the fixed sin-cos table added to the patch tokens as well.
    """

    base: float = 100.0
    absolute: bool = False

    def __post_init__(self):
        if not self.base > 1:
            raise ConfigError(f"rope: base must be > 1, got {self.base}")

    def check(self, cfg) -> None:
        """Every self-attention head must hold whole rotation pairs on every axis."""
        step = 2 * cfg.dims
        widths = [cfg.width] if cfg.backbone != "unet" else [cfg.width * m for m in cfg.channel_mult]
        for w in widths:
            if (w // cfg.heads) % step:
                raise ConfigError(
                    f"model.techniques.rope needs a head width divisible by {step} for {cfg.dims}D data; "
                    f"width {w} / heads {cfg.heads} = {w // cfg.heads}"
                )

    def rotary(self, dim: int, heads: int) -> Rotary:
        return Rotary(dim // heads, self.base)

    # Backbone hooks

    def edit_spec(self, spec, where):
        """Every self-attention rotates its queries and keys."""
        return dataclasses.replace(spec, rotary=self.rotary) if spec.self_attn else spec

    def dit_positions(self, grid: tuple[int, ...], dim: int) -> Tensor | None:
        """DiT: the absolute table added to the patch tokens: none, unless `absolute`."""
        from attnlab.models.embeddings import sincos_pos_embed

        return sincos_pos_embed(tuple(grid), dim)[None] if self.absolute else None
