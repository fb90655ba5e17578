"""Token merging (ToMe, Bolya et al. 2023, arXiv:2210.09461; for diffusion, Bolya & Hoffman 2023,
arXiv:2303.17604): before self-attention, similar tokens are merged by bipartite soft matching; after
it, every merged token gets its destination's output back, so the layer keeps its token grid.

One class serves both uses: a sampling-time control on a trained model (training-free, as in
tomesd) and, through `model.techniques.tome`, a control the model carries from its construction, so
it is trained with the merging it samples with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor, nn

from attnlab.attention import AttnCall, Control, select_layers
from attnlab.errors import ConfigError
from attnlab.techniques import register

Unmerge = Callable[[Tensor], Tensor]


# Matching


@lru_cache(maxsize=64)
def _partition(grid: tuple[int, ...], stride: int) -> tuple[Tensor, Tensor]:
    """(dst, src) token indices: the first token of every stride x stride cell (stride cell in 1D)
    is a destination, every other token a source that may merge into one."""
    coords = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    is_dst = torch.ones(grid, dtype=torch.bool)
    for c in coords:
        is_dst &= c % stride == 0
    flat = is_dst.flatten()
    return flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)


def merge_count(grid: tuple[int, ...], ratio: float, stride: int) -> int:
    """How many of the grid's N tokens `ratio` removes: ratio * N, at most the number of sources."""
    _, src = _partition(tuple(grid), stride)
    return min(int(ratio * math.prod(grid)), src.numel())


def bipartite_merge(x: Tensor, grid: tuple[int, ...], r: int, stride: int = 2) -> tuple[Tensor, Unmerge]:
    """Merge r grid tokens of `x` into their most similar destination (Bolya et al. 2023, Alg. 1).

    Sources and destinations split the grid (one destination per stride cell), each source picks its
    most cosine-similar destination, and the r sources with the best matches are averaged into theirs.

    Args:
        x: (B, N, C) tokens; the first prod(grid) are the grid in row-major order, any after it
            (e.g. in-context condition tokens) pass through unmerged.
        grid: the token grid.
        r: tokens to remove.
        stride: side of the cell that holds one destination.
    Returns:
        (merged (B, N - r, C), unmerge: (B, N - r, C') -> (B, N, C')).
    """
    b, n, c = x.shape
    g = math.prod(grid)
    dst, src = (i.to(x.device) for i in _partition(tuple(grid), stride))
    extra = x[:, g:]  # (B, N - G, C)
    with torch.no_grad():  # the matching is a discrete choice; gradients flow through the averages
        metric = x[:, :g] / x[:, :g].norm(dim=-1, keepdim=True).clamp_min(1e-6)
        scores = metric[:, src] @ metric[:, dst].transpose(1, 2)  # (B, S, D) cosine similarities
        best, best_dst = scores.max(dim=-1)  # (B, S) each source's closest destination
        order = best.argsort(dim=-1, descending=True)  # (B, S) most similar sources first
        merged_src, kept_src = order[:, :r], order[:, r:]  # positions in `src`
        into = best_dst.gather(1, merged_src)  # (B, r) destination position of each merged source

    def pick(t: Tensor, idx: Tensor) -> Tensor:  # rows idx (B, k) of t (B, M, C) -> (B, k, C)
        return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))

    x_src, x_dst = x[:, src], x[:, dst]  # (B, S, C), (B, D, C)
    dst_mean = x_dst.scatter_reduce(1, into[..., None].expand(-1, -1, c), pick(x_src, merged_src), "mean")
    merged = torch.cat([pick(x_src, kept_src), dst_mean, extra], dim=1)  # (B, S - r + D + N - G, C)
    n_kept, n_dst = kept_src.shape[1], dst.numel()

    def unmerge(y: Tensor) -> Tensor:
        kept, y_dst, y_extra = y[:, :n_kept], y[:, n_kept : n_kept + n_dst], y[:, n_kept + n_dst :]
        y_src = y.new_empty(b, src.numel(), y.shape[-1])  # (B, S, C')
        y_src.scatter_(1, kept_src[..., None].expand_as(kept), kept)
        y_src.scatter_(1, merged_src[..., None].expand(-1, -1, y.shape[-1]), pick(y_dst, into))
        out = y.new_empty(b, g, y.shape[-1])  # (B, G, C') back on the grid
        out[:, src], out[:, dst] = y_src, y_dst
        return torch.cat([out, y_extra], dim=1)

    return merged, unmerge


# The technique


@register(
    "tome",
    level=1,
    paper="ToMe (Bolya et al., 2023, arXiv:2210.09461); ToMe for SD (Bolya & Hoffman, 2023, arXiv:2303.17604)",
    training_free=True,
    provides=("controls", "check", "attach"),
    summary=(
        "merge similar tokens before self-attention, unmerge after: fewer tokens in q/k/v and the "
        "N^2 scores at the price of a matching step and some detail; also a model option "
        "(model.techniques.tome) to train with it"
    ),
)
@dataclass(eq=False)
class TokenMerging(Control):
    """Merge `ratio` of each selected self-attention layer's tokens (at most the sources of the
    stride cells) inside the sampling window [start, end).

    Args:
        ratio: fraction of the grid's tokens removed before attention (0 = the layer unchanged).
        stride: one destination token per stride x stride cell (stride cells in 1D).
        layers: self-attention layer name patterns (see `attnlab.attention.match_layer`).
        start, end: the sampling window, as fractions of the run (training: always on).
    """

    ratio: float = 0.5
    stride: int = 2
    layers: str | tuple[str, ...] = "**"
    start: float = 0.0
    end: float = 1.0

    kind = "self"

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"tome: ratio must be in [0, 1), got {self.ratio}")
        if not isinstance(self.stride, int) or self.stride < 2:
            raise ConfigError(f"tome: stride must be an integer >= 2, got {self.stride!r}")
        from attnlab.control.common import as_patterns, window

        self.window = window(self.start, self.end, "tome")
        self.layers = as_patterns(self.layers)

    def select(self, model: nn.Module):
        from attnlab.control.common import require_layers

        found = select_layers(model, self.layers, "self")
        require_layers("tome", model, found, self.layers, "self")
        return found

    def on_install(self, model: nn.Module, layers) -> None:
        check_model(getattr(model, "config", None))

    def before(self, call: AttnCall, x: Tensor) -> Tensor:
        r = merge_count(call.grid, self.ratio, self.stride)
        if r == 0 or x.shape[1] < math.prod(call.grid):  # nothing to merge, or merged already
            return x
        merged, call.scratch[id(self)] = bipartite_merge(x, call.grid, r, self.stride)
        return merged

    def after(self, call: AttnCall, out: Tensor) -> Tensor:
        unmerge = call.scratch.get(id(self))
        return out if unmerge is None else unmerge(out)

    def check(self, cfg) -> None:
        """Config-time check for the architectural use (called by `check_techniques`)."""
        check_model(cfg)

    def attach(self, model: nn.Module) -> None:
        """Install for the model's whole life (the architectural use; `build_model` calls it)."""
        layers = self.select(model)
        self.on_install(model, layers)
        for layer in layers:
            layer.controls.append(self)


def check_model(cfg) -> None:
    """Merging cannot shrink a key padding mask it does not see, keep rotary positions, or leave
    windows whole."""
    techniques = getattr(cfg, "techniques", {}) or {}
    if "in_context" in techniques and cfg.cond == "text":
        raise ConfigError(
            "tome cannot merge a sequence that holds in-context text tokens with a padding mask; "
            "drop tome or use cond=class with in_context"
        )
    if "rope" in techniques:
        raise ConfigError("tome merges tokens across grid positions, so rope cannot rotate them; drop one")
    if "window_attention" in techniques:
        raise ConfigError(
            "tome leaves fewer tokens than the grid, which window_attention needs whole; drop one"
        )
