"""A tiny text-conditioned denoiser built from `Attention` + `name_layers`, and a word-level tokenizer,
so the control tests run in seconds without the real backbones or the MiniLM encoder."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.attention import Attention, name_layers
from attnlab.conditioning import Condition


class Block(nn.Module):
    def __init__(self, width: int, heads: int, ctx_dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn1 = Attention(width, heads)
        self.attn2 = Attention(width, heads, context_dim=ctx_dim)

    def forward(self, h, grid, cond):
        h = h + self.attn1(self.norm1(h), grid=grid)
        return h + self.attn2(self.norm2(h), cond.tokens, cond.mask, grid=grid)


class ToyDenoiser(nn.Module):
    """eps-predictor on (B, C, *spatial) for dims 1 or 2: attention at full and half resolution."""

    def __init__(
        self,
        dims: int = 2,
        channels: int = 1,
        width: int = 32,
        heads: int = 2,
        ctx_dim: int = 16,
        depth: int = 2,
    ):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.dims = dims
        self.stem = conv(channels, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.blocks = nn.ModuleList([Block(width, heads, ctx_dim) for _ in range(depth)])
        self.mid = Block(width, heads, ctx_dim)
        self.head = conv(width, channels, 3, padding=1)
        name_layers(self)

    def forward(self, x, t, cond: Condition):
        h = self.stem(x) + self.time(t.float().view(-1, 1) / 1000).view(x.shape[0], -1, *[1] * self.dims)
        h = self._attend(h, self.blocks, cond)
        pooled = F.avg_pool2d(h, 2) if self.dims == 2 else F.avg_pool1d(h, 2)
        h = h + F.interpolate(self._attend(pooled, [self.mid], cond), size=h.shape[2:], mode="nearest")
        return self.head(h)

    def _attend(self, h, blocks, cond):
        b, c, *grid = h.shape
        seq = h.flatten(2).transpose(1, 2)  # (B, N, C)
        for blk in blocks:
            seq = blk(seq, tuple(grid), cond)
        return seq.transpose(1, 2).reshape(b, c, *grid)


class WordTokenizer:
    """Whitespace words plus [CLS]/[SEP], each word a fixed pseudo-random vector (no downloads)."""

    dim = 16

    def tokenize(self, text: str) -> list[str]:
        return text.lower().split()

    def tokens_of(self, text: str) -> list[str]:
        return ["[CLS]", *self.tokenize(text), "[SEP]"]

    def word_token_indices(self, prompt: str, word: str) -> list[int]:
        return [i for i, w in enumerate(self.tokens_of(prompt)) if w == word.lower()]

    def vector(self, word: str) -> torch.Tensor:
        seed = int(hashlib.sha1(word.encode()).hexdigest()[:8], 16)
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

    def encode(self, texts: list[str]):
        toks = [self.tokens_of(t) for t in texts]
        length = max(len(t) for t in toks)
        out = torch.zeros(len(texts), length, self.dim)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for i, ts in enumerate(toks):
            out[i, : len(ts)] = torch.stack([self.vector(w) for w in ts])
            mask[i, : len(ts)] = True
        return out, mask

    def condition(self, texts: list[str]) -> Condition:
        tokens, mask = self.encode(texts)
        return Condition(tokens=tokens, mask=mask)


def toy(dims: int = 2, seed: int = 0, **kw) -> ToyDenoiser:
    torch.manual_seed(seed)
    return ToyDenoiser(dims, **kw).eval()
