"""Per-token attention heat maps aggregated as DAAM does: per layer and head, over steps.

Tang et al., "What the DAAM: Interpreting Stable Diffusion Using Cross Attention" (ACL 2023,
arXiv:2210.04885), as its code does it (castorini/daam: `trace.py`, `heatmap.py`): each cross-attention
layer's map, per head, summed over the sampling steps; at query time every (layer, head) map is
upsampled bicubically to the sample's size and clamped at zero, and the maps are averaged over
layers and heads. The coarsest maps are left out (DAAM skips factor 8, the 8x8 maps of a 64x64
latent). A word's map is the mean over its tokens. Works on 2D grids (images) and 1D grids (audio,
upsampled linearly), and on point clouds: the points backbone regroups its tokens at every step, so
each step's map of a group token is spread onto the points with that step's own reading weights
(each point's 3 nearest centres, inverse squared distance) before the sum over steps; a point keeps
its index across steps, so the per-point maps add up as pixels do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.attention import AttnCall, Control, select_layers
from attnlab.control.common import (
    as_patterns,
    check_positive,
    grid_tokens,
    is_main_pass,
    require_layers,
    resize,
    rows,
    window,
)
from attnlab.errors import ConfigError
from attnlab.techniques import register


@register(
    "heatmaps",
    level=5,
    paper="DAAM (Tang et al., ACL 2023, arXiv:2210.04885)",
    training_free=True,
    provides=("controls",),
    needs_prompts="attnlab maps",
    needs_text=True,
    summary="per-word heat maps from cross-attention (the image-to-text block of joint attention), aggregated as DAAM's code (per layer and head, summed over steps, coarsest maps left out): explains a sample; maps only the selected layers",
    modalities=(1, 2, "points"),
    modality_notes={
        "tokens": "binds a prompt's words to an image or audio grid (attnlab maps); a text run's heat maps are generated tokens on condition tokens, in its PoC report",
    },
)
@dataclass(eq=False)
class HeatMaps(Control):
    """Records the conditional rows' cross-attention of the selected layers during sampling.

    Args:
        layers: cross-attention layer name patterns.
        start, end: the step window, as fractions of the run.
        skip_factor: maps whose grid is at least this many times coarser than the sample (per side,
            DAAM's `factor`) are left out, as DAAM leaves out Stable Diffusion's 8x8 maps of a 64x64
            latent; where every recorded map is that coarse, all are kept. None keeps every map.
            Maps spread onto a cloud's points are at the sample's size and always kept.
    After sampling, `maps(size)` gives per-token maps and `word_map(indices, size)` per-word maps
    (on points, `size` is (N,), the cloud's number of points).
    """

    layers: str | tuple[str, ...] = "**"
    start: float = 0.0
    end: float = 1.0
    skip_factor: float | None = 8

    def __post_init__(self):
        self.layers = as_patterns(self.layers)
        self.window = window(self.start, self.end, "heatmaps")
        if self.skip_factor is not None:
            check_positive("heatmaps", "skip_factor", self.skip_factor)
        self.kind = "cross"
        self.sums: dict[str, Tensor] = {}  # layer name -> (B, heads, L, *grid or N points) over steps
        self.count = 0  # layer-steps recorded
        self.points: int | None = None  # N where the maps are spread onto a cloud's points

    def select(self, model: nn.Module):
        found = select_layers(model, self.layers, ("cross", "joint"))
        require_layers("heatmaps", model, found, self.layers, "cross")
        return found

    def active(self, call: AttnCall) -> bool:
        return is_main_pass(call) and "cond" in call.roles and super().active(call)

    def needs_probs(self, call: AttnCall) -> bool:
        return True

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        c = text_block(call, p)
        if grid_tokens(call, c.shape[-2]):
            c = rows(call, c, "cond").detach().float()  # (B, heads, N, L)
            m = c.transpose(-1, -2)  # (B, heads, L, N)
            if call.point_weights is None:
                m = m.reshape(*m.shape[:3], *call.grid)  # (B, heads, L, *grid)
            else:  # this step's grouping: token maps onto the points, before the sum over steps
                near, w = (rows(call, t, "cond") for t in call.point_weights)
                m = spread_to_points(m, near, w)  # (B, heads, L, points)
                self.points = m.shape[-1]
            prev = self.sums.get(call.name)
            self.sums[call.name] = m if prev is None else prev + m
            self.count += 1
        return p

    def on_install(self, model, layers):
        self.reset()

    def reset(self) -> None:
        self.sums, self.count, self.points = {}, 0, None

    def maps(self, size: Sequence[int]) -> Tensor:
        """(B, L, *size): per-token maps at the sample's size `size`: each (layer, head) map summed
        over steps, upsampled, clamped at zero, then the mean over layers and heads (DAAM's
        `compute_global_heat_map`)."""
        if not self.count:
            raise ConfigError("heatmaps: nothing was recorded (no conditional cross-attention call ran)")
        size = tuple(size)
        if self.points is not None and size != (self.points,):
            raise ConfigError(
                f"heatmaps: the maps are on a cloud of {self.points} points; ask for size ({self.points},), got {size}"
            )
        kept = self._kept(size)
        total = sum(self._upsampled(self.sums[name], size).sum(1) for name in kept)
        return total / sum(self.sums[name].shape[1] for name in kept)

    def _kept(self, size: tuple[int, ...]) -> list[str]:
        """The layers whose maps are fine enough to use (all of them if none is)."""

        def factor(m: Tensor) -> float:  # sample side / map side, DAAM's sqrt(latent_hw // N)
            return (math.prod(size) / math.prod(m.shape[3:])) ** (1 / len(size))

        skip = None if self.skip_factor is None else self.skip_factor * (1 - 1e-9)  # roots of exact powers
        fine = [n for n, m in self.sums.items() if skip is None or factor(m) < skip]
        return fine or list(self.sums)

    @staticmethod
    def _upsampled(m: Tensor, size: tuple[int, ...]) -> Tensor:
        b, h, k = m.shape[:3]
        up = resize(m.reshape(b, h * k, *m.shape[3:]), size)  # (B, heads * L, *size), bicubic in 2D
        return up.reshape(b, h, k, *size).clamp(min=0)  # clamping per head fixes bicubic undershoot

    def word_map(self, indices: Sequence[int], size: Sequence[int]) -> Tensor:
        """(B, *size) map of the tokens `indices` (one word's pieces, every occurrence): their mean
        (DAAM's `compute_word_heat_map`), min-max normalised per row (its `expand_as`)."""
        if not indices:
            raise ConfigError("heatmaps: a word map needs at least one token index")
        return normalise(self.maps(size)[:, list(indices)].mean(1))


def spread_to_points(m: Tensor, near: Tensor, w: Tensor) -> Tensor:
    """Per-token maps m (B, heads, L, G) read at the points: point i gets sum_j w[i, j] m[near[i, j]],
    as the points backbone spreads its group tokens (PointNet++ feature propagation).
    near, w: (B, N, k) token indices and weights. Returns (B, heads, L, N)."""
    b, n, _ = near.shape
    spread = m.new_zeros(b, n, m.shape[-1]).scatter_add_(-1, near, w.to(m))  # (B, N, G)
    return m @ spread.transpose(1, 2)[:, None]  # (B, heads, L, N)


def text_block(call: AttnCall, p: Tensor) -> Tensor:
    """The image-query x text-key block of a call's probabilities (B, heads, N, L): a cross-
    attention's whole map, or on a joint layer (SD3, Flux) its block renormalised over the text
    keys, the map a cross-attention to the same text would give."""
    if call.text is None:
        return p
    block = p[:, :, call.image, call.text]
    return block / block.sum(-1, keepdim=True).clamp(min=torch.finfo(block.dtype).tiny)


def normalise(m: Tensor, shift: bool = True) -> Tensor:
    """Per row, to [0, 1]: (m - min) / (max - min) as DAAM's relative maps, or m / max with
    shift=False. A constant row becomes zero. (B, *size)."""
    m = m.clamp(min=0)
    flat = m.flatten(1)
    low = flat.amin(1) if shift else torch.zeros_like(flat[:, 0])
    span = (flat.amax(1) - low).clamp(min=1e-12)
    view = (-1, *[1] * (m.dim() - 1))
    return (m - low.view(view)) / span.view(view)


def word_maps(
    hm: HeatMaps, prompt: str, words: Sequence[str], encoder, size, row: int = 0
) -> dict[str, Tensor]:
    """Heat map per word of `prompt` for sample `row`, via `encoder.word_token_indices`. word -> (*size)."""
    out = {}
    for w in words:
        idx = encoder.word_token_indices(prompt, w)
        if not idx:
            raise ConfigError(f"heatmaps: word {w!r} is not in the prompt {prompt!r}")
        out[w] = hm.word_map(idx, size)[row]
    return out
