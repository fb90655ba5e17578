"""Attend-and-Excite: at early steps, move the latent so every chosen token gets strong attention somewhere.

Chefer et al., "Attend-and-Excite: Attention-Based Semantic Guidance for Text-to-Image Diffusion
Models" (SIGGRAPH 2023, arXiv:2301.13826). Each chosen token's cross-attention map (text tokens
softmaxed at temperature 1/100, Gaussian-smoothed) should peak high; the loss is
max_k (1 - max_attention_k), and z_t <- z_t - step * grad(loss), with iterative refinement at a few
steps until the loss is below 1 - threshold. Neglected objects then appear.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from attnlab.attention import AttnCall, Control, select_layers
from attnlab.control.common import (
    as_patterns,
    check_positive,
    extra_pass,
    gaussian_blur,
    grid_tokens,
    require_layers,
    resize,
    to_grid,
    window,
)
from attnlab.errors import ConfigError
from attnlab.techniques import register

EXCITE_ROLE = "excite"


@dataclass(eq=False)
class DifferentiableCrossMaps(Control):
    """On the excite pass, keeps the selected layers' head-averaged cross maps with their graph."""

    layers: tuple[str, ...] = ("**",)
    maps: list[Tensor] = field(default_factory=list)

    def __post_init__(self):
        self.kind = "cross"

    def select(self, model: nn.Module):
        found = select_layers(model, self.layers, "cross")
        require_layers("attend_excite", model, found, self.layers, "cross")
        return found

    def active(self, call: AttnCall) -> bool:
        return call.roles == (EXCITE_ROLE,)

    def needs_probs(self, call: AttnCall) -> bool:
        return True

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        if grid_tokens(call, p.shape[-2]):
            self.maps.append(to_grid(p.mean(1), call.grid))  # (B, L, *grid)
        return p

    def take(self) -> Tensor:
        """(B, L, *grid) mean over layers at the finest recorded grid; clears the record."""
        if not self.maps:
            raise ConfigError("attend_excite: no cross-attention map was recorded on the excite pass")
        size = max((tuple(m.shape[2:]) for m in self.maps), key=lambda s: sum(s))
        out = torch.stack([resize(m, size) for m in self.maps]).mean(0)
        self.maps = []
        return out


@register(
    "attend_excite",
    level=5,
    paper="Attend-and-Excite (Chefer et al., SIGGRAPH 2023, arXiv:2301.13826)",
    training_free=True,
    provides=("guidance", "bind_prompts"),
    needs_prompts="attnlab.control.AttendExcite.bind",
    needs_text=True,
    summary="latent updates at early steps so every named object gets attention: fewer missing objects, slower",
)
@dataclass(eq=False)
class AttendExcite:
    """Attend-and-Excite, a plug-in for `attnlab.diffusion.sample(guidances=...)` (acts in `prepare`).

    Args:
        end: fraction of the run during which the latent is updated (the paper: 25 of 50 steps).
        step_size: gradient step (scaled by sqrt(linspace(1, 0.5)) over the run, as the paper).
        refine_at: fractions of the run at which the update is iterated until the loss is low enough.
        thresholds: the attention each token must reach at the matching `refine_at` step.
        max_refine: at most this many refinement iterations per refine step.
        temperature: softmax temperature over the text tokens (the paper: 1/100).
        smooth_sigma: Gaussian smoothing of each token map before its maximum is taken.
        layers: cross-attention layer name patterns.
    Call `bind(token_indices, spans)` before sampling.
    """

    end: float = 0.5
    step_size: float = 20.0
    refine_at: tuple[float, ...] = (0.0, 0.2, 0.4)
    thresholds: tuple[float, ...] = (0.05, 0.5, 0.8)
    max_refine: int = 20
    temperature: float = 0.01
    smooth_sigma: float = 0.5
    layers: str | tuple[str, ...] = "**"

    def __post_init__(self):
        window(0.0, self.end, "attend_excite")
        check_positive("attend_excite", "step_size", self.step_size, allow_zero=True)
        check_positive("attend_excite", "temperature", self.temperature)
        if len(self.refine_at) != len(self.thresholds):
            raise ConfigError(
                f"attend_excite: refine_at has {len(self.refine_at)} entries but thresholds has {len(self.thresholds)}"
            )
        self.layers = as_patterns(self.layers)
        self._maps = DifferentiableCrossMaps(self.layers)
        self.tokens: list[list[int]] = []
        self.spans: list[tuple[int, int]] = []

    def bind(self, token_indices: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]) -> AttendExcite:
        """Per batch row: the chosen tokens' positions and the [first, last) span of text tokens
        (special tokens and padding outside it). Positions are in the encoded token sequence."""
        if len(token_indices) != len(spans):
            raise ConfigError(f"attend_excite: {len(token_indices)} token lists for {len(spans)} spans")
        for idx, (a, b) in zip(token_indices, spans):
            if not idx or any(not a <= i < b for i in idx):
                raise ConfigError(
                    f"attend_excite: token indices {list(idx)} must be non-empty and inside [{a}, {b})"
                )
        self.tokens, self.spans = [list(i) for i in token_indices], [tuple(s) for s in spans]
        return self

    def bind_prompts(self, prompts: Sequence[str], encoder, words: Sequence[str] = ()) -> AttendExcite:
        """A copy bound to one batch: per prompt, the tokens of those `words` it holds (all its text
        tokens when it holds none), inside the span of its text tokens (without [CLS] and [SEP])."""
        tokens, spans = [], []
        for p in prompts:
            span = (1, len(encoder.tokens_of(p)) - 1)
            idx = {i for w in words if _has_word(p, w) for i in encoder.word_token_indices(p, w)}
            tokens.append(sorted(idx) or list(range(*span)))
            spans.append(span)
        return dataclasses.replace(self).bind(tokens, spans)

    # Guidance plug-in protocol

    def controls(self) -> list[Control]:
        return [self._maps]

    def active(self, i: int, steps: int) -> bool:
        return False  # no correction term: it acts on the latent in `prepare`

    def correction(self, model, x_in, t, cond, out, ctx) -> Tensor:
        return torch.zeros_like(out["cond"])

    def prepare(self, model, x: Tensor, t: Tensor, cond, ctx: dict) -> Tensor:
        """The latent entering step i, moved so the chosen tokens' attention peaks rise."""
        i, steps = ctx["i"], ctx["steps"]
        if not self.tokens or i / steps >= self.end or self.step_size == 0:
            return x
        step = self.step_size * (1.0 - 0.5 * i / max(1, steps - 1)) ** 0.5  # sqrt(linspace(1, 0.5))
        z = x.detach()
        threshold = self._threshold(i, steps)
        if threshold is not None:
            for _ in range(self.max_refine):
                loss, grad = self._loss_and_grad(model, z, t, cond, ctx)
                if loss.max() <= 1 - threshold:
                    break
                z = z - step * grad
        _, grad = self._loss_and_grad(model, z, t, cond, ctx)
        return (z - step * grad).detach()

    def _threshold(self, i: int, steps: int) -> float | None:
        for frac, thr in zip(self.refine_at, self.thresholds):
            if i == round(frac * steps):
                return thr
        return None

    def token_maxima(self, model, x: Tensor, t: Tensor, cond, ctx: dict) -> list[Tensor]:
        """Per row, (K,): each chosen token's smoothed attention peak at latent x (no gradient)."""
        with torch.no_grad():
            return self._maxima(self._excite_maps(model, x, t, cond, ctx))

    def _loss_and_grad(self, model, z: Tensor, t: Tensor, cond, ctx: dict) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            peaks = self._maxima(self._excite_maps(model, z, t, cond, ctx))
            loss = torch.stack([(1 - p).amax() for p in peaks])  # (B,): each row's most neglected token
            (grad,) = torch.autograd.grad(loss.sum(), z)
        return loss.detach(), grad

    def _excite_maps(self, model, z: Tensor, t: Tensor, cond, ctx: dict) -> Tensor:
        x_in = ctx["scheduler"].scale_model_input(z, t[0]) if "scheduler" in ctx else z
        with extra_pass(model, (EXCITE_ROLE,), ctx, t):
            model(x_in, t, cond)
        return self._maps.take()  # (B, L, *grid)

    def _maxima(self, maps: Tensor) -> list[Tensor]:
        if maps.shape[0] != len(self.tokens):
            raise ConfigError(
                f"attend_excite: bound to {len(self.tokens)} rows, the batch has {maps.shape[0]}"
            )
        rows = []
        for r, (idx, (a, b)) in enumerate(zip(self.tokens, self.spans)):
            text = (maps[r, a:b] / self.temperature).softmax(0)  # (T, *grid): tokens compete per position
            chosen = text[[k - a for k in idx]].unsqueeze(1)  # (K, 1, *grid)
            smooth = gaussian_blur(chosen, self.smooth_sigma) if self.smooth_sigma > 0 else chosen
            rows.append(smooth.flatten(1).amax(1))  # (K,)
        return rows


def _has_word(prompt: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, re.IGNORECASE) is not None
