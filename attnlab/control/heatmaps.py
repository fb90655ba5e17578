"""Per-token attention heat maps, aggregated over layers, heads and steps (DAAM).

Tang et al., "What the DAAM: Interpreting Stable Diffusion Using Cross Attention" (ACL 2023,
arXiv:2210.04885): the cross-attention a token receives, averaged over heads, summed over steps,
upsampled from every layer's grid to the sample's resolution, clamped at zero and averaged over
layers, localises what the token produced. Works on 2D grids (images) and 1D grids (audio).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.attention import AttnCall, Control, select_layers
from attnlab.control.common import (
    as_patterns,
    grid_tokens,
    is_main_pass,
    require_layers,
    resize,
    rows,
    to_grid,
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
    summary="per-word heat maps from cross-attention: explains a sample; maps only the selected layers",
)
@dataclass(eq=False)
class HeatMaps(Control):
    """Records the conditional rows' cross-attention of the selected layers during sampling.

    Args:
        layers: cross-attention layer name patterns.
        start, end: the step window, as fractions of the run.
    After sampling, `maps(size)` gives per-token maps and `word_map(indices, size)` per-word maps.
    """

    layers: str | tuple[str, ...] = "**"
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        self.layers = as_patterns(self.layers)
        self.window = window(self.start, self.end, "heatmaps")
        self.kind = "cross"
        self.sums: dict[tuple[int, ...], Tensor] = {}  # grid -> (B, L, *grid) summed maps
        self.count = 0  # layer-steps recorded

    def select(self, model: nn.Module):
        found = select_layers(model, self.layers, "cross")
        require_layers("heatmaps", model, found, self.layers, "cross")
        return found

    def active(self, call: AttnCall) -> bool:
        return is_main_pass(call) and "cond" in call.roles and super().active(call)

    def needs_probs(self, call: AttnCall) -> bool:
        return True

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        if grid_tokens(call, p.shape[-2]):
            m = to_grid(rows(call, p, "cond").detach().float().mean(1), call.grid)  # (B, L, *grid)
            prev = self.sums.get(call.grid)
            self.sums[call.grid] = m if prev is None else prev + m
            self.count += 1
        return p

    def on_install(self, model, layers):
        self.reset()

    def reset(self) -> None:
        self.sums, self.count = {}, 0

    def maps(self, size: Sequence[int]) -> Tensor:
        """(B, L, *size): per-token maps, mean over layer-steps, resized and clamped at zero."""
        if not self.count:
            raise ConfigError("heatmaps: nothing was recorded (no conditional cross-attention call ran)")
        size = tuple(size)
        total = sum(resize(s, size).clamp(min=0) for s in self.sums.values())
        return total / self.count

    def word_map(self, indices: Sequence[int], size: Sequence[int]) -> Tensor:
        """(B, *size) map of the tokens `indices` (one word's pieces), min-max normalised per row."""
        if not indices:
            raise ConfigError("heatmaps: a word map needs at least one token index")
        return normalise(self.maps(size)[:, list(indices)].mean(1))


def normalise(m: Tensor, shift: bool = True) -> Tensor:
    """Per row, to [0, 1]: (m - min) / (max - min) as DAAM's relative maps, or m / max with
    shift=False (Prompt-to-Prompt's blend mask). A constant row becomes zero. (B, *size)."""
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
