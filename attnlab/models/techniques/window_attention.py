"""Windowed (local) self-attention (Swin Transformer, Liu et al. 2021, arXiv:2103.14030): tokens attend
only within non-overlapping windows of the grid, so the cost is O(N w^2 d) instead of O(N^2 d);
alternate DiT blocks shift the windows by half so that information crosses window borders."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.models.specs import AttnSpec, Where
from attnlab.models.techniques.scope import Scope
from attnlab.techniques import register

# Layout


@dataclass(frozen=True)
class WindowLayout:
    """How a grid splits into windows.

    Attributes:
        order: (N,) token indices grouped window by window (window-major, row-major inside).
        inverse: (N,) the permutation back to grid order.
        windows: number of windows; each holds N // windows tokens.
        mask: (windows, L, L) bool, True where two tokens of a shifted window were neighbours before
            the cyclic shift (Swin's mask); None without a shift.
        same: (N, N) bool in grid order, True where query and key may attend (for explicit maps).
    """

    order: Tensor
    inverse: Tensor
    windows: int
    mask: Tensor | None
    same: Tensor


def _sides(grid: tuple[int, ...], window: int) -> tuple[int, ...]:
    """Window side per axis: `window`, or the whole axis when the axis is shorter."""
    sides = tuple(min(window, n) for n in grid)
    for n, s in zip(grid, sides):
        if n % s:
            raise ConfigError(f"window_attention: window {s} does not tile a grid side of {n} (grid {grid})")
    return sides


@lru_cache(maxsize=64)
def window_layout(
    grid: tuple[int, ...], window: int, shift: int, device: torch.device | None = None
) -> WindowLayout:
    """The windows of `grid` after a cyclic shift by `shift` tokens on every axis the window does not
    cover whole (a window covering an axis is never shifted, so a window covering the grid is global)."""
    sides = _sides(grid, window)
    coords = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")  # k x grid
    window_id, inner, region = (torch.zeros(grid, dtype=torch.long) for _ in range(3))
    for c, n, s in zip(coords, grid, sides):
        sh = shift % s if s < n else 0
        moved = (c - sh) % n  # position after rolling the grid back by sh (Swin's torch.roll)
        window_id = window_id * (n // s) + moved // s
        inner = inner * s + moved % s
        region = region * 2 + (moved >= n - sh).long() if sh else region * 2  # 1: wrapped around
    window_id, inner, region = window_id.flatten(), inner.flatten(), region.flatten()  # (N,) each
    per = math.prod(sides)  # tokens per window
    windows = math.prod(grid) // per
    order = torch.argsort(window_id * per + inner)  # (N,)
    same = (window_id[:, None] == window_id[None]) & (region[:, None] == region[None])  # (N, N)
    mask = None
    if bool(region.any()):
        r = region[order].view(windows, per)
        mask = r[:, :, None] == r[:, None, :]  # (windows, L, L)
    inverse = torch.argsort(order)
    if device is not None:  # built once per device, not per call
        order, inverse, same = order.to(device), inverse.to(device), same.to(device)
        mask = None if mask is None else mask.to(device)
    return WindowLayout(order, inverse, windows, mask, same)


# Kernel


@dataclass(frozen=True)
class WindowKernel:
    """The kernel an Attention layer runs: softmax attention inside each (shifted) window."""

    window: int
    shift: int = 0

    def layout(self, q: Tensor, grid: tuple[int, ...], key_mask: Tensor | None) -> WindowLayout:
        if q.shape[2] != math.prod(grid) or key_mask is not None:
            raise ConfigError(
                f"window_attention needs exactly the grid's tokens: {q.shape[2]} tokens on grid {grid} "
                "and no padding mask (merged, extra or padded tokens, e.g. ToMe, in-context or time tokens, "
                "do not fit in windows)"
            )
        return window_layout(tuple(grid), self.window, self.shift, q.device)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, ...], key_mask: Tensor | None = None
    ) -> Tensor:
        lay = self.layout(q, grid, key_mask)
        b, h, n, d = q.shape

        def windowed(t: Tensor) -> Tensor:  # windows as extra heads: 4D inputs keep SDPA's fused kernel
            return t[:, :, lay.order].view(b, h * lay.windows, n // lay.windows, d)  # (B, heads * W, L, d)

        mask = None if lay.mask is None else lay.mask.repeat(h, 1, 1)  # (heads * W, L, L)
        out = F.scaled_dot_product_attention(windowed(q), windowed(k), windowed(v), attn_mask=mask)
        return out.view(b, h, n, d)[:, :, lay.inverse]  # back to grid order, (B, heads, N, d)

    def probs(self, q: Tensor, k: Tensor, grid: tuple[int, ...], key_mask: Tensor | None = None) -> Tensor:
        """The (B, heads, N, N) map, zero outside each query's window."""
        same = self.layout(q, grid, key_mask).same
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, heads, N, N)
        return scores.masked_fill(~same, float("-inf")).softmax(dim=-1)


# Technique


@register(
    "window_attention",
    level=2,
    paper="Swin Transformer (Liu et al., 2021, arXiv:2103.14030)",
    training_free=False,
    provides=("check", "edit_spec"),
    modality_notes={
        "points": "windows of consecutive grid tokens; point tokens in farthest-point order are not neighbours in space (the kNN groups are the points' neighbourhoods)"
    },
    summary=(
        "self-attention inside w x w windows (shifted every other DiT block): cost linear in tokens; "
        "long-range mixing only through depth, convolutions or shifts"
    ),
    modalities=(1, 2, "tokens"),
)
@dataclass
class WindowAttention:
    """Windowed self-attention in the selected layers.

    Args:
        window: window side in tokens (w x w on images, w on audio); an axis shorter than it is
            one window, so a window covering the grid is global attention.
        shift: DiT only: odd blocks shift their windows by window // 2 (Swin's shifted windows).
            U-Net blocks never shift; their convolutions carry information across windows.
        resolutions: U-Net feature sizes that get it (None: every attention resolution).
        blocks: DiT block indices that get it (None: every block).
    """

    window: int = 4
    shift: bool = True
    resolutions: tuple[int, ...] | None = None
    blocks: tuple[int, ...] | None = None

    def __post_init__(self):
        if not (isinstance(self.window, int) and not isinstance(self.window, bool) and self.window >= 1):
            raise ConfigError(
                f"model.techniques.window_attention.window={self.window!r} is not allowed: expected a positive integer"
            )
        self.scope = Scope("window_attention", self.resolutions, self.blocks)

    def check(self, cfg) -> None:
        self.scope.check(cfg)
        extra = [n for n in ("in_context", "tome") if n in cfg.techniques]
        if cfg.techniques.get("time_embedding", {}).get("mode") == "token":
            extra.append("time_embedding mode=token")
        if extra:
            raise ConfigError(
                f"model.techniques.window_attention cannot be combined with {extra[0]}: windows need "
                "exactly the grid's tokens (no merged or extra tokens)"
            )
        if cfg.backbone == "tokens":  # one window grid: the sequence
            sizes = [cfg.size]
        elif cfg.backbone == "dit":
            sizes = [cfg.size // cfg.patch]
        else:
            sizes = [s for s in cfg.feature_sizes() if s in cfg.attn_resolutions]
            sizes += [cfg.feature_sizes()[-1]] if cfg.mid_attention else []
        grids = [(s,) * cfg.dims for s in sizes]
        for grid in grids:
            try:
                _sides(grid, self.window)
            except ConfigError as e:
                raise ConfigError(f"model.techniques.{e}") from None

    def edit_spec(self, spec: AttnSpec, where: Where) -> AttnSpec:
        if not (spec.self_attn and self.scope.contains(where)):
            return spec
        odd = where.side == "block" and where.index % 2 == 1
        kernel = WindowKernel(self.window, self.window // 2 if self.shift and odd else 0)
        return dataclasses.replace(spec, mixer=kernel)
