"""Embeddings: sinusoidal timestep embedding + MLP (Ho et al. 2020), fixed sin-cos position
embeddings (Vaswani et al. 2017; 2D as in MAE/DiT), and the condition embedder (class table with a
null row, text tokens projected for cross-attention plus a pooled text vector)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnlab.conditioning import Condition


def sinusoid_freqs(dim: int, max_period: float = 10000.0) -> Tensor:
    """(dim // 2,) frequencies exp(-log(max_period) * i / half)."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)


class TimestepEmbedding(nn.Module):
    """t (B,) -> [cos, sin] features (B, freq_dim) -> MLP -> (B, emb_dim).

    Args:
        freq_dim: number of sinusoidal features (even).
        emb_dim: output width.
    """

    def __init__(self, freq_dim: int, emb_dim: int):
        super().__init__()
        # Kept as a buffer so no step rebuilds it; not saved, it is a function of freq_dim.
        self.register_buffer("freqs", sinusoid_freqs(freq_dim), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: Tensor) -> Tensor:
        args = t.float()[:, None] * self.freqs[None]  # (B, freq_dim // 2)
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """(N,) positions -> (N, dim) fixed [sin, cos] features."""
    args = positions.float()[:, None] * sinusoid_freqs(dim)[None]  # (N, dim // 2)
    return torch.cat([args.sin(), args.cos()], dim=-1)


def sincos_pos_embed(grid: tuple[int, ...], dim: int) -> Tensor:
    """Fixed position embedding of a token grid, row-major: (N, dim).

    A 2D grid (h, w) spends half the width on the row and half on the column (MAE, DiT); a 1D grid
    (n,) spends all of it on the position.
    """
    if len(grid) == 1:
        return sincos_1d(torch.arange(grid[0]), dim)
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each
    return torch.cat([sincos_1d(rows.flatten(), dim // 2), sincos_1d(cols.flatten(), dim // 2)], dim=-1)


class CondEmbedding(nn.Module):
    """Condition -> (vector added to the time embedding, context tokens and mask for cross-attention).

    Args:
        kind: "none", "class" or "text".
        emb_dim: width of the time embedding the vector is added to.
        num_classes: classes for kind="class"; the table has one more row, the null class (label -1).
        context_dim: width of the encoder's text tokens.
        token_dim: width of the projected tokens that cross-attention reads.
    A missing condition (None, or a Condition without the needed field) is the null condition, so
    the unconditional pass of classifier-free guidance needs no encoder.
    """

    def __init__(
        self, kind: str, emb_dim: int, num_classes: int = 0, context_dim: int = 384, token_dim: int = 0
    ):
        super().__init__()
        self.kind, self.num_classes, self.context_dim = kind, num_classes, context_dim
        if kind == "class":
            self.table = nn.Embedding(num_classes + 1, emb_dim)
        elif kind == "text":
            self.proj = nn.Linear(context_dim, token_dim)
            self.pool = nn.Linear(context_dim, emb_dim)

    def forward(
        self, cond: Condition | None, batch: int
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Returns (vector (B, emb_dim) or None, tokens (B, L, token_dim) or None, mask (B, L) or None)."""
        if self.kind == "class":
            return self._labels(cond, batch), None, None
        if self.kind == "text":
            return self._text(cond, batch)
        return None, None, None

    def _labels(self, cond: Condition | None, batch: int) -> Tensor:
        labels = cond.labels if cond is not None else None
        if labels is None:
            labels = torch.full((batch,), -1, dtype=torch.long, device=self.table.weight.device)
        return self.table(torch.where(labels < 0, self.num_classes, labels))  # -1 -> the null row

    def _text(self, cond: Condition | None, batch: int):
        tokens = cond.tokens if cond is not None else None
        if tokens is None:  # the null text: one zero token (see Condition.null_like)
            tokens = self.pool.weight.new_zeros(batch, 1, self.context_dim)
            mask = torch.ones(batch, 1, dtype=torch.bool, device=tokens.device)
        else:
            mask = cond.mask if cond.mask is not None else tokens.new_ones(tokens.shape[:2], dtype=torch.bool)
        real = tokens.masked_fill(~mask[..., None], 0.0)  # padding contributes nothing, whatever it holds
        count = mask.sum(1, keepdim=True).clamp(min=1).to(tokens.dtype)  # (B, 1)
        pooled = real.sum(1) / count  # masked mean, (B, context_dim)
        return self.pool(pooled), self.proj(tokens), mask


def batch_timesteps(t: Tensor | float | int, batch: int, device: torch.device) -> Tensor:
    """Timesteps as a (B,) tensor: a scalar or one-element tensor is shared by the batch."""
    t = torch.as_tensor(t, device=device)
    return t.reshape(1).expand(batch) if t.numel() == 1 else t.reshape(batch)
