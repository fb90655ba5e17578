"""Long skip connections between transformer blocks (U-ViT, Bao et al. 2023, arXiv:2209.12152): the
first half of the DiT blocks hands its outputs to the mirrored blocks of the second half, which fuse
them with a linear map of the concatenation, as a U-Net's skips do across resolutions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.errors import ConfigError
from attnlab.techniques import register


class LongSkips(nn.Module):
    """Runs DiT blocks with U-ViT skips: block i < n saves its output; block depth - n + j first maps
    cat(h, saved of block n - 1 - j) back to the token width. With an odd depth the middle block
    has no skip.

    Args:
        depth: number of blocks.
        dim: token width.
    """

    def __init__(self, depth: int, dim: int):
        super().__init__()
        self.fuse = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(depth // 2))

    def forward(
        self, blocks: nn.ModuleList, h: Tensor, c: Tensor, ctx, grid: tuple[int, ...], key_mask=None
    ) -> Tensor:
        n, first_out = len(self.fuse), len(blocks) - len(self.fuse)
        saved = []
        for i, blk in enumerate(blocks):
            if i >= first_out:
                h = self.fuse[i - first_out](torch.cat([h, saved.pop()], dim=-1))  # (B, N, 2d) -> (B, N, d)
            h = blk(h, c, ctx, grid, key_mask)
            if i < n:
                saved.append(h)
        return h


@register(
    "long_skips",
    level=4,
    paper="U-ViT long skip connections (Bao et al., 2023, arXiv:2209.12152)",
    training_free=False,
    provides=("check", "run_blocks"),
    hosts=("dit",),
    summary=(
        "U-Net-like skips between mirrored DiT blocks: low-level features reach the output blocks, "
        "faster convergence in U-ViT; one 2 dim x dim linear per skip"
    ),
    modalities=(1, 2, "tokens", "points"),
)
@dataclass
class LongSkipsTechnique:
    """Long skips in a DiT (depth >= 2)."""

    def check(self, cfg) -> None:
        if cfg.depth < 2:
            raise ConfigError(f"model.techniques.long_skips needs model.depth >= 2, got {cfg.depth}")

    def run_blocks(self, depth: int, dim: int) -> LongSkips:
        """DiT: the module that runs the blocks with skips."""
        return LongSkips(depth, dim)
