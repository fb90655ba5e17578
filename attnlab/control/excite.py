"""Attend-and-Excite: at early steps, move the latent so every chosen token gets strong attention somewhere.

Chefer et al., "Attend-and-Excite: Attention-Based Semantic Guidance for Text-to-Image Diffusion
Models" (SIGGRAPH 2023, arXiv:2301.13826). Each chosen token's cross-attention map (text tokens
softmaxed at temperature 1/100, Gaussian-smoothed) should peak high; the loss is
max_k (1 - max_attention_k), and z_t <- z_t - step * grad(loss), with iterative refinement at a few
steps until the loss is below 1 - threshold. Neglected objects then appear.

On diffusers pipelines (`attnlab.attention.control(pipe, [AttendExcite(...).bind([[2, 5]])])`) the
token indices are positions of the pipeline's tokenizer, as the pipeline's `token_indices`; the
latent update happens before the step's main pass and reaches the pipeline's latents. There, as
the pipeline (`StableDiffusionAttendAndExcitePipeline`) does: `bind` without spans scores every text
position but the first and the last (`attention_maps[:, :, 1:-1]`), `max_iter_to_alter` and a
`thresholds` dict count steps, and `attn_res=(16, 16)` keeps the maps of that query grid only (see
`AttendExcite.diffusers`). On joint attention (SD3, Flux) a token's map is the image-query to
text-key block of the joint map, renormalised over the text keys (the softmax restricted to the
text: what a cross-attention map is); SD3's text is CLIP's 77 positions followed by T5's.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from attnlab.attention import AttnCall, Control, sample_rows, select_layers
from attnlab.control.common import (
    as_patterns,
    check_positive,
    extra_pass,
    grid_tokens,
    require_layers,
    resize,
    separable_blur,
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
    attn_res: tuple[int, ...] | None = None

    def __post_init__(self):
        self.kind = "cross"

    def select(self, model: nn.Module):
        found = select_layers(model, self.layers, ("cross", "joint"))
        require_layers("attend_excite", model, found, self.layers, "cross")
        return found

    def active(self, call: AttnCall) -> bool:
        return call.roles == (EXCITE_ROLE,)

    def needs_probs(self, call: AttnCall) -> bool:
        return True

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        m = p
        if call.text is not None:  # joint map: image queries to text keys, renormalised over the text
            m = p[:, :, call.image, call.text]
            m = m / m.sum(-1, keepdim=True)
        res_ok = self.attn_res is None or tuple(call.grid) == tuple(self.attn_res)
        if res_ok and grid_tokens(call, m.shape[-2]):
            self.maps.append(to_grid(m.mean(1), call.grid))  # (B, L, *grid)
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
    summary="latent updates at early steps so every named object gets attention, each latent refined on "
    "its own as the reference code: fewer missing objects, slower",
    modality_notes={
        "points": "smooths cross-attention maps over the grid and sums them over steps; the points backbone regroups its tokens at every step, so a token is not one place across steps",
        "tokens": "steps the continuous latent along a gradient of cross-attention; token ids take no gradient step",
    },
)
@dataclass(eq=False)
class AttendExcite:
    """Attend-and-Excite, a plug-in for `attnlab.diffusion.sample(guidances=...)` (acts in `prepare`).

    The defaults are the reference code's (yuval-alaluf/Attend-and-Excite, 50 steps: thresholds
    {0: 0.05, 10: 0.5, 20: 0.8}, scale_factor 20, max_iter_to_alter 25, 20 refinement steps, a 3x3
    smoothing kernel with sigma 0.5). Each latent row is refined on its own: a row that reached its
    threshold is left alone while others still refine, so a sample never depends on its batch.

    Args:
        end: fraction of the run during which the latent is updated (the reference: 25 of 50 steps).
        step_size: gradient step, scaled by sqrt(linspace(1, 0.5)) over the run (scale_factor).
        refine_at: fractions of the run at which the update is iterated until the loss is low enough
            (step i refines when i == round(fraction * steps)).
        thresholds: the attention each token must reach at the matching `refine_at` step.
        max_refine: at most this many refinement updates per refine step.
        temperature: softmax temperature over the text tokens (the reference: 1/100).
        smooth_sigma: sigma of the reference's smoothing kernel, weights exp(-(d / (2 sigma))^2)
            (0 = no smoothing).
        smooth_size: taps of that kernel per spatial dim (odd).
        layers: cross-attention layer name patterns.
        max_iter_to_alter: the latent is updated at steps i < max_iter_to_alter (diffusers'
            argument, in steps); None: while i / steps < end.
        attn_res: keep only the maps of layers whose query grid is this (diffusers: (16, 16));
            None: every selected layer's, resized to the finest grid.
    `thresholds` may also be a dict {step index: threshold}, diffusers' form (then `refine_at` is
    unused). Call `bind(token_indices, spans)` before sampling. After a run, `refinements[i]` holds
    each row's number of refinement updates at refine step i (before the step's own update).
    """

    end: float = 0.5
    step_size: float = 20.0
    refine_at: tuple[float, ...] = (0.0, 0.2, 0.4)
    thresholds: tuple[float, ...] | dict[int, float] = (0.05, 0.5, 0.8)
    max_refine: int = 20
    temperature: float = 0.01
    smooth_sigma: float = 0.5
    smooth_size: int = 3
    layers: str | tuple[str, ...] = "**"
    max_iter_to_alter: int | None = None
    attn_res: tuple[int, ...] | None = None

    @classmethod
    def diffusers(cls, token_indices, **overrides) -> AttendExcite:
        """Bound to `token_indices` with `StableDiffusionAttendAndExcitePipeline`'s defaults:
        max_iter_to_alter 25, thresholds {0: 0.05, 10: 0.5, 20: 0.8}, scale_factor 20 (step_size),
        attn_res (16, 16), a 3x3 smoothing kernel with sigma 0.5, 20 refinement steps, and every
        text position but the first and the last scored. `overrides` set other fields."""
        ref = {"max_iter_to_alter": 25, "thresholds": {0: 0.05, 10: 0.5, 20: 0.8}, "attn_res": (16, 16)}
        return cls(**{**ref, **overrides}).bind(token_indices)

    def __post_init__(self):
        window(0.0, self.end, "attend_excite")
        check_positive("attend_excite", "step_size", self.step_size, allow_zero=True)
        check_positive("attend_excite", "temperature", self.temperature)
        check_positive("attend_excite", "max_refine", self.max_refine, allow_zero=True)
        check_positive("attend_excite", "smooth_sigma", self.smooth_sigma, allow_zero=True)
        if self.smooth_size < 1 or self.smooth_size % 2 == 0:
            raise ConfigError(
                f"attend_excite: smooth_size must be an odd number >= 1, got {self.smooth_size}"
            )
        if isinstance(self.thresholds, dict):
            self.thresholds = {int(k): float(v) for k, v in self.thresholds.items()}
        elif len(self.refine_at) != len(self.thresholds):
            raise ConfigError(
                f"attend_excite: refine_at has {len(self.refine_at)} entries but thresholds has {len(self.thresholds)}"
            )
        self.layers = as_patterns(self.layers)
        self.attn_res = None if self.attn_res is None else tuple(int(r) for r in self.attn_res)
        self._maps = DifferentiableCrossMaps(self.layers, attn_res=self.attn_res)
        self.tokens: list[list[int]] = []
        self.spans: list[tuple[int, int] | None] = []
        self.refinements: dict[int, list[int]] = {}

    def bind(
        self,
        token_indices: Sequence[Sequence[int]] | Sequence[int],
        spans: Sequence[tuple[int, int]] | None = None,
    ) -> AttendExcite:
        """Per batch row: the chosen tokens' positions and the [first, last) span of text tokens
        (special tokens and padding outside it). Positions are in the encoded token sequence (on a
        diffusers pipeline: its tokenizer's, as `pipe.get_indices(prompt)` lists them); one list of
        ints is one row's. spans None: every position but the first and the last of the sequence
        the maps have (diffusers' `[1:-1]`), checked when the maps are read."""
        if token_indices and all(isinstance(i, int) for i in token_indices):
            token_indices = [token_indices]
        if spans is None:
            for idx in token_indices:
                if not idx or min(idx) < 1:
                    raise ConfigError(f"attend_excite: token indices {list(idx)} must be non-empty and >= 1")
            self.tokens, self.spans = [list(i) for i in token_indices], [None] * len(token_indices)
            return self
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
        alters = i / steps < self.end if self.max_iter_to_alter is None else i < self.max_iter_to_alter
        if not self.tokens or not alters or self.step_size == 0:
            return x
        if x.shape[0] != len(self.tokens):
            raise ConfigError(f"attend_excite: bound to {len(self.tokens)} rows, the batch has {x.shape[0]}")
        step = self.step_size * (1.0 - 0.5 * i / max(1, steps - 1)) ** 0.5  # sqrt(linspace(1, 0.5))
        z = x.detach().clone()
        every = torch.arange(x.shape[0], device=x.device)
        loss, grad = self._loss_and_grad(model, z, t, cond, ctx, every)
        threshold = self._threshold(i, steps)
        if threshold is not None:
            counts = self._refine(model, z, t, cond, ctx, loss, grad, step, max(0.0, 1.0 - threshold))
            self.refinements[i] = counts.tolist()
        return _descend(z, loss, grad, step).detach()

    def _refine(self, model, z, t, cond, ctx, loss, grad, step, target) -> Tensor:
        """The reference's iterative refinement, row by row, in place on z, loss and grad.

        Each iteration updates the row with the gradient at its current latent, then stops once the
        loss that drove the update was at most `target`, or after `max_refine` updates; the loss
        and gradient are then taken again at the refined latent for the step's own update.
        """
        todo = loss > target  # (B,) rows that refine at all
        counts = torch.zeros_like(todo, dtype=torch.long)
        going = todo & (counts < self.max_refine)
        while going.any():
            r = going.nonzero().flatten()
            z[r] = _descend(z[r], loss[r], grad[r], step)
            counts[r] += 1
            going = going & (loss > target) & (counts < self.max_refine)
            r = going.nonzero().flatten()
            if len(r):
                loss[r], grad[r] = self._loss_and_grad(model, z[r], t, cond, ctx, r)
        r = todo.nonzero().flatten()
        if len(r):
            loss[r], grad[r] = self._loss_and_grad(model, z[r], t, cond, ctx, r)
        return counts

    def _threshold(self, i: int, steps: int) -> float | None:
        if isinstance(self.thresholds, dict):
            return self.thresholds.get(i)
        for frac, thr in zip(self.refine_at, self.thresholds):
            if i == round(frac * steps):
                return thr
        return None

    def token_maxima(self, model, x: Tensor, t: Tensor, cond, ctx: dict) -> list[Tensor]:
        """Per row, (K,): each chosen token's smoothed attention peak at latent x (no gradient)."""
        every = torch.arange(x.shape[0], device=x.device)
        with torch.no_grad():
            return self._maxima(self._excite_maps(model, x, t, cond, ctx, every), every)

    def _loss_and_grad(self, model, z: Tensor, t: Tensor, cond, ctx: dict, rows: Tensor):
        """Per row of z (the batch rows `rows`): the loss max_k (1 - peak_k) and its gradient."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            peaks = self._maxima(self._excite_maps(model, z, t, cond, ctx, rows), rows)
            loss = torch.stack([(1 - p).clamp(min=0).amax() for p in peaks])  # (n,): the most neglected token
            (grad,) = torch.autograd.grad(loss.sum(), z)  # rows are independent: each gets its own
        return loss.detach(), grad

    def _excite_maps(self, model, z: Tensor, t: Tensor, cond, ctx: dict, rows: Tensor) -> Tensor:
        sch = ctx.get("scheduler")
        x_in = sch.scale_model_input(z, t[0]) if hasattr(sch, "scale_model_input") else z
        tr = t[rows]
        with extra_pass(model, (EXCITE_ROLE,), ctx, tr), sample_rows(model, rows):  # the rows still refining
            model(x_in, tr, cond.index(rows))
        return self._maps.take()  # (n, L, *grid)

    def _maxima(self, maps: Tensor, rows: Tensor) -> list[Tensor]:
        kernel = smoothing_kernel(self.smooth_size, self.smooth_sigma) if self.smooth_sigma > 0 else None
        peaks = []
        for m, r in zip(maps, rows.tolist()):
            (a, b), idx = self.spans[r] or (1, m.shape[0] - 1), self.tokens[r]
            if max(idx) >= b:
                raise ConfigError(
                    f"attend_excite: token indices {idx} must lie in [{a}, {b}) of {m.shape[0]} text tokens"
                )
            text = (m[a:b] / self.temperature).softmax(0)  # (T, *grid): tokens compete per position
            chosen = text[[k - a for k in idx]].unsqueeze(1)  # (K, 1, *grid)
            smooth = separable_blur(chosen, kernel) if kernel is not None else chosen
            peaks.append(smooth.flatten(1).amax(1))  # (K,)
        return peaks


def smoothing_kernel(size: int, sigma: float) -> Tensor:
    """The reference's 1D smoothing weights (its GaussianSmoothing): exp(-((d - c) / (2 sigma))^2), summed to 1."""
    d = torch.arange(size, dtype=torch.float64) - (size - 1) / 2  # cast to the maps by separable_blur
    k = torch.exp(-((d / (2 * sigma)) ** 2))
    return k / k.sum()


def _descend(z: Tensor, loss: Tensor, grad: Tensor, step: float) -> Tensor:
    """z - step * grad, rows whose loss is exactly 0 left alone (the reference skips them)."""
    moving = (loss != 0).to(z.dtype).view(-1, *[1] * (z.dim() - 1))
    return z - step * moving * grad


def _has_word(prompt: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, re.IGNORECASE) is not None
