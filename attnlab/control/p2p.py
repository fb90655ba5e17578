"""Prompt-to-Prompt: edit a sample by injecting the source prompt's attention maps into the edit's pass.

Hertz et al., "Prompt-to-Prompt Image Editing with Cross-Attention Control" (ICLR 2023,
arXiv:2208.01626). Source and edit prompts are sampled together from the same noise, one batch
row each (row 0 = source, rows 1.. = edits, inside the cond chunk). In the cross window the edit
rows' cross-attention maps are taken from the source row (replace: token for token; refine: through
a token alignment, new words keep their own maps; reweight: a word's column scaled); in the self
window the edit rows' self-attention maps are the source's; a local blend keeps the source outside
the region the chosen words attend to.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.attention import AttnCall, Control, select_layers
from attnlab.control.common import as_patterns, check_choice, is_main_pass, require_layers, window
from attnlab.control.heatmaps import HeatMaps, normalise
from attnlab.errors import ConfigError
from attnlab.techniques import register

MODES = ("replace", "refine", "reweight")


def align_tokens(src: Sequence[str], dst: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Token alignment of `dst` to `src` (longest matching blocks).

    Returns:
        mapper: (len(dst),) long, the source position each destination token copies (0 if none).
        alpha: (len(dst),) float, 1 where a destination token has a source token, 0 for new words.
    """
    mapper = torch.zeros(len(dst), dtype=torch.long)
    alpha = torch.zeros(len(dst))
    for a, b, n in difflib.SequenceMatcher(a=list(src), b=list(dst), autojunk=False).get_matching_blocks():
        mapper[b : b + n] = torch.arange(a, a + n)
        alpha[b : b + n] = 1.0
    return mapper, alpha


@dataclass(eq=False)
class EditPlan:
    """Per edit row: where its cross-attention comes from. Built by `PromptToPrompt.bind`."""

    mapper: Tensor  # (E, L) long: source token position per edit token
    alpha: Tensor  # (E, L): 1 = take the source map, 0 = keep the edit's own
    scale: Tensor  # (E, L): reweighting factor per edit token
    blend: list[list[int]] = field(default_factory=list)  # per row (source first): blend token indices


@dataclass(eq=False)
class AttentionInjection(Control):
    """Writes the source row's maps into the edit rows of the cond chunk, inside the step windows."""

    owner: PromptToPrompt

    def __post_init__(self):
        self.kind = None
        self.layers = self.owner.layers

    def select(self, model: nn.Module):
        found = select_layers(model, self.layers)
        require_layers("p2p", model, [m for m in found if m.kind == "cross"], self.layers, "cross")
        return found

    def active(self, call: AttnCall) -> bool:
        o = self.owner
        if o.plan is None or not is_main_pass(call) or "cond" not in call.roles:
            return False
        if call.kind == "cross":
            return o.cross_window.contains(call.step, call.num_steps)
        small = o.self_max_tokens is None or math.prod(call.grid) <= o.self_max_tokens
        return small and o.self_window.contains(call.step, call.num_steps)

    def needs_probs(self, call: AttnCall) -> bool:
        return True

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        sl = call.chunk(p, "cond")
        c = p[sl]  # (R, heads, N, L): row 0 source, rows 1.. edits
        if c.shape[0] != self.owner.rows:
            raise ConfigError(
                f"p2p: bound to {self.owner.rows} prompts but the batch has {c.shape[0]} cond rows"
            )
        edited = self._cross(c) if call.kind == "cross" else c[:1].expand_as(c)
        p = p.clone()
        p[sl] = edited
        return p

    def _cross(self, c: Tensor) -> Tensor:
        plan, base = self.owner.plan, c[0]  # (heads, N, L)
        rows = [base]
        for r in range(1, c.shape[0]):
            m, a, s = plan.mapper[r - 1].to(c.device), plan.alpha[r - 1].to(c), plan.scale[r - 1].to(c)
            mapped = base.index_select(-1, m)  # (heads, N, L): source column per edit token
            rows.append((mapped * a + c[r] * (1 - a)) * s)
        return torch.stack(rows)


@register(
    "p2p",
    level=5,
    paper="Prompt-to-Prompt (Hertz et al., ICLR 2023, arXiv:2208.01626)",
    training_free=True,
    provides=("guidance",),
    needs_prompts="attnlab edit",
    needs_text=True,
    not_in_poc="a sampling technique: p2p edits one prompt into another; use `attnlab edit`",
    summary="edit a sample by swapping, refining or reweighting words while keeping its layout",
)
@dataclass(eq=False)
class PromptToPrompt:
    """Prompt-to-Prompt editing, a plug-in for `attnlab.diffusion.sample(guidances=...)`.

    Args:
        mode: "replace" (word swap, equal token counts), "refine" (words added or changed, aligned),
            "reweight" (scale the attention to `word` by `factor`; the prompts may also differ).
        word: the word whose attention "reweight" scales.
        factor: the reweighting factor (1 changes nothing).
        blend: words whose cross-attention marks the region the edit may change (local blend).
        blend_threshold: mask threshold on the normalised blend map.
        blend_start: fraction of the run after which the local blend acts.
        cross_start, cross_end: step window (fractions) of cross-attention injection.
        self_start, self_end: step window (fractions) of self-attention injection.
        self_max_tokens: self-attention maps are injected only in layers with at most this many
            query tokens (the fine layers carry texture, not layout); None = all layers.
        layers: layer name patterns the injection acts on.
    """

    mode: str = "replace"
    word: str | None = None
    factor: float = 1.0
    blend: tuple[str, ...] = ()
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    cross_start: float = 0.0
    cross_end: float = 0.8
    self_start: float = 0.0
    self_end: float = 0.4
    self_max_tokens: int | None = 256
    layers: str | tuple[str, ...] = "**"

    def __post_init__(self):
        check_choice("p2p", "mode", self.mode, MODES)
        if self.mode == "reweight" and not self.word:
            raise ConfigError("p2p: mode='reweight' needs word= (the word whose attention is scaled)")
        self.cross_window = window(self.cross_start, self.cross_end, "p2p cross")
        self.self_window = window(self.self_start, self.self_end, "p2p self")
        window(self.blend_start, 1.0, "p2p blend")
        self.layers = as_patterns(self.layers)
        self.blend = tuple(self.blend)
        self.plan: EditPlan | None = None
        self.rows = 0
        self._inject = AttentionInjection(self)
        self._maps = HeatMaps(self.layers) if self.blend else None

    def bind(
        self, tokens: Sequence[Sequence[str]], word_index: Callable[[int, str], list[int]]
    ) -> PromptToPrompt:
        """Prepare for one batch: `tokens[r]` are row r's tokens at their encoded positions (row 0 =
        source); `word_index(r, word)` gives a word's token positions in row r ([] if absent)."""
        if len(tokens) < 2:
            raise ConfigError("p2p: needs a source prompt and at least one edit prompt")
        src, length = list(tokens[0]), max(len(t) for t in tokens)
        mappers, alphas, scales = [], [], []
        for r, dst in enumerate(tokens[1:], start=1):
            m, a = self._map(src, list(dst), r)
            s = torch.ones(len(dst))
            if self.mode == "reweight":
                idx = word_index(r, self.word)
                if not idx:
                    raise ConfigError(f"p2p: reweight word {self.word!r} is not in edit prompt {r}")
                s[idx] = self.factor
            mappers.append(_pad(m, length, 0))
            alphas.append(_pad(a, length, 0.0))
            scales.append(_pad(s, length, 1.0))
        blend = [sorted({i for w in self.blend for i in word_index(r, w)}) for r in range(len(tokens))]
        if self.blend and not blend[0] and not any(blend[1:]):
            raise ConfigError(f"p2p: none of the blend words {list(self.blend)} is in the prompts")
        self.plan = EditPlan(torch.stack(mappers), torch.stack(alphas), torch.stack(scales), blend)
        self.rows = len(tokens)
        return self

    def _map(self, src: list[str], dst: list[str], r: int) -> tuple[Tensor, Tensor]:
        if self.mode == "replace":
            if len(src) != len(dst):
                raise ConfigError(
                    f"p2p: mode='replace' needs equal token counts, source has {len(src)} and edit {r} has "
                    f"{len(dst)} ({dst}); use mode='refine' for added or longer words"
                )
            return torch.arange(len(dst)), torch.ones(len(dst))
        return align_tokens(src, dst)

    # Guidance plug-in protocol

    def controls(self) -> list[Control]:
        return [self._inject] + ([self._maps] if self._maps is not None else [])

    def active(self, i: int, steps: int) -> bool:
        return False  # no correction term: the edit acts on the attention maps and the latent

    def correction(self, model, x_in, t, cond, out, ctx) -> Tensor:
        return torch.zeros_like(out["cond"])

    def prepare(self, model, x: Tensor, t: Tensor, cond, ctx: dict) -> Tensor:
        """Local blend of the latent entering step i (= after step i-1, where Prompt-to-Prompt blends)."""
        if self._maps is None or ctx["i"] / ctx["steps"] < self.blend_start or not self._maps.count:
            return x
        return self.blend_latent(x)

    def blend_latent(self, x: Tensor) -> Tensor:
        """x[r] = x[0] + mask_r * (x[r] - x[0]) for edit rows r; mask_r = blend region of row 0 or r."""
        if self._maps is None or not self._maps.count:
            return x
        mask = self.blend_mask(tuple(x.shape[2:])).to(x)  # (R, 1, *spatial)
        region = torch.maximum(mask[:1], mask[1:])
        return torch.cat([x[:1], x[:1] + region * (x[1:] - x[:1])])

    def blend_mask(self, size: tuple[int, ...]) -> Tensor:
        """(R, 1, *size) binary mask per row: its blend words' normalised map above the threshold."""
        maps = self._maps.maps(size)  # (R, L, *size)
        out = []
        for r, idx in enumerate(self.plan.blend):
            if not idx:
                out.append(torch.zeros(1, *size, device=maps.device))
                continue
            m = maps[r : r + 1, idx].mean(1, keepdim=True)  # (1, 1, *size)
            m = _max_pool(m)  # grow the region by one pixel, as Prompt-to-Prompt's 3x3 max-pool
            out.append((normalise(m[:, 0], shift=False) > self.blend_threshold).float())
        return torch.stack(out)  # (R, 1, *size)


def _pad(t: Tensor, length: int, value) -> Tensor:
    return F.pad(t, (0, length - t.shape[0]), value=value)


def _max_pool(m: Tensor) -> Tensor:
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[m.dim() - 2]
    return pool(m, kernel_size=3, stride=1, padding=1)
