"""Prompt-to-Prompt: edit a sample by injecting the source prompt's attention maps into the edit's pass.

Hertz et al., "Prompt-to-Prompt Image Editing with Cross-Attention Control" (ICLR 2023,
arXiv:2208.01626), as its code does it (google/prompt-to-prompt: `seq_aligner.py`, `ptp_utils.py`
and the Stable Diffusion notebook's `AttentionControlEdit`, `AttentionReplace`, `AttentionRefine`,
`AttentionReweight` and `LocalBlend`). Source and edit prompts are sampled together from the same
noise, one batch row each (row 0 = source, rows 1.. = edits, inside the cond chunk). In the cross
window the edit rows' cross-attention maps are taken from the source row (replace: token for token;
refine: through the global token alignment, new words keep their own maps; reweight: a word's
column scaled); in the self window the edit rows' self-attention maps are the source's, in the
coarse layers only; a local blend keeps the source outside the region the chosen words attend to.
Each edit row depends on the source row and on nothing else in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.attention import AttnCall, Control, select_layers
from attnlab.control.common import (
    as_patterns,
    check_choice,
    check_positive,
    grid_tokens,
    is_main_pass,
    require_layers,
    rows,
    to_grid,
    window,
)
from attnlab.errors import ConfigError
from attnlab.techniques import register

MODES = ("replace", "refine", "reweight")

# Token alignment: seq_aligner's global (Needleman-Wunsch) alignment

GAP, MATCH, MISMATCH = 0, 1, -1  # seq_aligner.ScoreParams(gap=0, match=1, mismatch=-1)
_LEFT, _UP, _DIAG = 1, 2, 3  # traceback moves, in the order seq_aligner prefers them on a tie


def global_alignment(src: Sequence[str], dst: Sequence[str]) -> list[int]:
    """For each token of `dst`, the position of the `src` token it is aligned to, or -1 (a new token).

    Needleman-Wunsch with seq_aligner's scores and tie order (a tie goes to skipping a `dst` token,
    then to skipping a `src` token, then to pairing them), traced back from the end as
    `seq_aligner.get_aligned_sequences` does. With gap 0 and mismatch -1 a pair is always two equal
    tokens, so a changed word is a new `dst` token and a dropped `src` token.
    """
    n, m = len(src), len(dst)
    score = [[(i + j) * GAP if i == 0 or j == 0 else 0 for j in range(m + 1)] for i in range(n + 1)]
    move = [[_LEFT if i == 0 else _UP for _ in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i][j - 1] + GAP, score[i - 1][j] + GAP
            diag = score[i - 1][j - 1] + (MATCH if src[i - 1] == dst[j - 1] else MISMATCH)
            score[i][j] = best = max(left, up, diag)
            move[i][j] = _LEFT if best == left else _UP if best == up else _DIAG
    mapping, i, j = [-1] * m, n, m
    while i > 0 or j > 0:
        step = move[i][j]
        if step == _DIAG:
            i, j = i - 1, j - 1
            mapping[j] = i
        elif step == _LEFT:
            j -= 1
        else:
            i -= 1
    return mapping


def align_tokens(src: Sequence[str], dst: Sequence[str]) -> tuple[Tensor, Tensor]:
    """`seq_aligner.get_mapper` over the two token sequences (special tokens included).

    Returns:
        mapper: (len(dst),) long, the source position each destination token copies (0 if none).
        alpha: (len(dst),) float, 1 where a destination token has a source token, 0 for new words.
    """
    mapping = torch.tensor(global_alignment(list(src), list(dst)), dtype=torch.long)
    alpha = (mapping >= 0).float()
    return mapping.clamp(min=0), alpha


def reference_steps(start: float, end: float, rows: int) -> range:
    """The steps a fractional window covers as prompt-to-prompt counts them: `int(start * rows)` up
    to `int(end * rows)`, where `rows` is T + 1 for the cross window (`get_time_words_attention_alpha`
    has one row per step plus one) and T for the self window (`num_self_replace`)."""
    return range(int(start * rows), int(end * rows))


@dataclass(eq=False)
class EditPlan:
    """Per edit row: where its cross-attention comes from. Built by `PromptToPrompt.bind`."""

    mapper: Tensor  # (E, L) long: source token position per edit token
    alpha: Tensor  # (E, L): 1 = take the source map, 0 = keep the edit's own
    scale: Tensor  # (E, L): reweighting factor per edit token (the reference's equalizer)
    blend: list[list[int]] = field(default_factory=list)  # per row (source first): blend token indices


@dataclass(eq=False)
class AttentionInjection(Control):
    """Writes the source row's maps into the edit rows of the cond chunk, inside the step windows
    (`AttentionControlEdit.forward`). Cross-scale layers carry no words and are left alone."""

    owner: PromptToPrompt

    def __post_init__(self):
        self.kind = None
        self.layers = self.owner.layers

    def select(self, model: nn.Module):
        found = [m for m in select_layers(model, self.layers) if m.kind in ("self", "cross", "joint")]
        words = [m for m in found if m.kind in ("cross", "joint")]
        require_layers("p2p", model, words, self.layers, "cross")
        return found

    def active(self, call: AttnCall) -> bool:
        o = self.owner
        if o.plan is None or not is_main_pass(call) or "cond" not in call.roles:
            return False
        return self.cross_on(call) or self.self_on(call)

    def cross_on(self, call: AttnCall) -> bool:
        o = self.owner
        return call.kind in ("cross", "joint") and o.in_window(
            o.cross_start, o.cross_end, call, extra_row=True
        )

    def self_on(self, call: AttnCall) -> bool:
        o = self.owner
        small = o.self_max_tokens is None or math.prod(call.grid) <= o.self_max_tokens
        return call.kind in ("self", "joint") and small and o.in_window(o.self_start, o.self_end, call)

    def needs_probs(self, call: AttnCall) -> bool:
        return True

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        sl = call.chunk(p, "cond")
        c = p[sl]  # (R, heads, N, L): row 0 source, rows 1.. edits
        if c.shape[0] != self.owner.rows:
            raise ConfigError(
                f"p2p: bound to {self.owner.rows} prompts but the batch has {c.shape[0]} cond rows"
            )
        if call.kind == "joint":
            edited = self._joint(call, c)
        else:
            edited = self._cross(c) if call.kind == "cross" else c[:1].expand_as(c)
        p = p.clone()
        p[sl] = edited
        return p

    def _joint(self, call: AttnCall, c: Tensor) -> Tensor:
        """A joint (image + text) map (SD3, Flux): in the cross window the image-to-text block is
        edited as the cross-attention map it would be (renormalised over the text keys, edited,
        then scaled back to the edit row's own mass on the text), in the self window the
        image-to-image block is the source's distribution at the edit row's own mass on the image
        keys; replace and refine so keep every row summing to one. The text rows are left alone."""
        img, txt = call.image, call.text
        out = c.clone()
        if self.cross_on(call):
            block = c[:, :, img, txt]  # (R, heads, N, L)
            mass = block.sum(-1, keepdim=True)
            out[:, :, img, txt] = self._cross(block / mass.clamp(min=torch.finfo(c.dtype).tiny)) * mass
        if self.self_on(call):
            block = c[:, :, img, img]
            mass = block.sum(-1, keepdim=True)
            out[:, :, img, img] = (block[:1] / mass[:1].clamp(min=torch.finfo(c.dtype).tiny)) * mass
        return out

    def _cross(self, c: Tensor) -> Tensor:
        """Refine (`base[..., mapper] * alpha + edit * (1 - alpha)`), then the equalizer, as
        `AttentionReweight` wrapping `AttentionRefine`; replace is the identity mapper with alpha 1."""
        plan, base = self.owner.plan, c[0]  # (heads, N, L)
        out = [base]
        for r in range(1, c.shape[0]):
            m, a, s = plan.mapper[r - 1].to(c.device), plan.alpha[r - 1].to(c), plan.scale[r - 1].to(c)
            mapped = base.index_select(-1, m)  # (heads, N, L): source column per edit token
            out.append((mapped * a + c[r] * (1 - a)) * s)
        return torch.stack(out)


@dataclass(eq=False)
class BlendMaps(Control):
    """Records the cond rows' cross-attention for the local blend, before the injection changes
    it (`AttentionStore.forward` runs first in `AttentionControlEdit.forward`): per grid, the sum
    over steps, layers and heads. Every step of the loop's own passes, every cross layer. (The
    reference averages over layers and heads; the blend divides by the maximum, so scale cancels.)"""

    def __post_init__(self):
        self.kind = "cross"
        self.sums: dict[tuple[int, ...], Tensor] = {}  # grid -> (R, L, *grid)

    def active(self, call: AttnCall) -> bool:
        return is_main_pass(call) and "cond" in call.roles

    def needs_probs(self, call: AttnCall) -> bool:
        return True

    def select(self, model: nn.Module):
        return select_layers(model, "**", ("cross", "joint"))

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        from attnlab.control.heatmaps import text_block

        c = text_block(call, p)
        if grid_tokens(call, c.shape[-2]):
            m = to_grid(rows(call, c, "cond").detach().float().sum(1), call.grid)  # (R, L, *grid)
            prev = self.sums.get(call.grid)
            self.sums[call.grid] = m if prev is None else prev + m
        return p

    def on_install(self, model, layers):
        self.sums = {}

    def nearest_grid(self, size: tuple[int, ...], scale: float) -> tuple[int, ...]:
        """The recorded grid closest to `scale` times the sample side (log scale; a tie goes to the
        finer grid)."""

        def distance(g: tuple[int, ...]):
            ratio = (math.prod(g) / math.prod(size)) ** (1 / len(size))
            return round(abs(math.log(ratio / scale)), 9), -math.prod(g)  # rounded: ties are exact

        return min(self.sums, key=distance)


@register(
    "p2p",
    level=5,
    paper="Prompt-to-Prompt (Hertz et al., ICLR 2023, arXiv:2208.01626)",
    training_free=True,
    provides=("guidance",),
    needs_prompts="attnlab edit",
    needs_text=True,
    not_in_poc="a sampling technique: p2p edits one prompt into another; use `attnlab edit`",
    summary="edit a sample by swapping, refining (global token alignment) or reweighting words while keeping its layout, as the reference code",
    modality_notes={
        "points": "swaps maps token by token between prompts; the source and edited clouds are grouped apart at every step, so token i is not one place in both",
        "tokens": "edits a prompt's cross-attention maps of an image; a text run has no prompt to edit",
    },
)
@dataclass(eq=False)
class PromptToPrompt:
    """Prompt-to-Prompt editing, a plug-in for `attnlab.diffusion.sample(guidances=...)`.

    Args:
        mode: "replace" (word swap, equal token counts: `AttentionReplace`), "refine" (words added
            or changed, globally aligned: `AttentionRefine`), "reweight" (scale the attention to
            `word` by `factor`: `AttentionReweight` over a refine, so the prompts may also differ).
        word: the word whose attention "reweight" scales.
        factor: the reweighting factor (1 changes nothing).
        blend: words whose cross-attention marks the region the edit may change (`LocalBlend`);
            each row uses the words it holds.
        blend_threshold: mask threshold on the blend map divided by its maximum (reference: 0.3).
        blend_start: the blend acts after step k when k >= int(blend_start * steps) (0: after every
            step, as the Stable Diffusion notebook; its null-text notebook's `start_blend` is 0.2).
        blend_scale: grid side / sample side of the cross-attention maps the blend reads. The
            notebook reads Stable Diffusion's 16x16 maps of a 64x64 latent (0.25); a model with no
            layer at that ratio uses the recorded grid nearest to it (log scale, ties to the finer).
        cross_start, cross_end: window (fractions) of cross-attention injection, counted as the
            reference does: steps int(start * (T + 1)) to int(end * (T + 1)), end excluded.
        self_start, self_end: window of self-attention injection: steps int(start * T) to int(end * T).
        self_max_tokens: self-attention maps are injected only in layers with at most this many
            query tokens (the reference: 16x16; the fine layers carry texture, not layout); None = all.
        layers: layer name patterns the injection acts on (cross-scale layers never: no words).
    """

    mode: str = "replace"
    word: str | None = None
    factor: float = 1.0
    blend: tuple[str, ...] = ()
    blend_threshold: float = 0.3
    blend_start: float = 0.0
    blend_scale: float = 0.25
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
        window(self.cross_start, self.cross_end, "p2p cross")
        window(self.self_start, self.self_end, "p2p self")
        window(self.blend_start, 1.0, "p2p blend")
        check_positive("p2p", "blend_scale", self.blend_scale)
        self.layers = as_patterns(self.layers)
        self.blend = tuple(self.blend)
        self.plan: EditPlan | None = None
        self.rows = 0
        self._inject = AttentionInjection(self)
        self._maps = BlendMaps() if self.blend else None

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
            # Padding keys are masked out (the reference attends to its padding tokens and maps them
            # one to one); here they have no attention to copy, so they keep the edit's own zeros.
            mappers.append(_pad(m, length, 0))
            alphas.append(_pad(a, length, 0.0))
            scales.append(_pad(s, length, 1.0))
        blend = [sorted({i for w in self.blend for i in word_index(r, w)}) for r in range(len(tokens))]
        if self.blend and not any(blend):
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

    def in_window(self, start: float, end: float, call: AttnCall, extra_row: bool = False) -> bool:
        if call.step is None or call.num_steps is None:
            return True  # outside a sampling loop the injection is always on
        return call.step in reference_steps(start, end, call.num_steps + int(extra_row))

    # Guidance plug-in protocol

    def controls(self) -> list[Control]:
        # The blend recorder first, so it sees each row's own maps before the injection.
        return ([self._maps] if self._maps is not None else []) + [self._inject]

    def active(self, i: int, steps: int) -> bool:
        return False  # no correction term: the edit acts on the attention maps and the latent

    def correction(self, model, x_in, t, cond, out, ctx) -> Tensor:
        return torch.zeros_like(out["cond"])

    def prepare(self, model, x: Tensor, t: Tensor, cond, ctx: dict) -> Tensor:
        """The local blend of the latent entering step i, i.e. after step i - 1 (`step_callback`)."""
        return self.after_step(x, ctx["i"] - 1, ctx["steps"])

    def after_step(self, x: Tensor, k: int, steps: int) -> Tensor:
        """The latent after step k (0-based) of `steps`, locally blended where the blend acts then."""
        if self._maps is None or not self._maps.sums or k < 0 or k < int(self.blend_start * steps):
            return x
        return self.blend_latent(x)

    def blend_latent(self, x: Tensor) -> Tensor:
        """x[r] = x[0] + mask * (x[r] - x[0]) for edit rows r; mask = blend region of row 0 or row r."""
        if self._maps is None or not self._maps.sums:
            return x
        region = self.blend_region(tuple(x.shape[2:])).to(x)  # (R - 1, 1, *spatial)
        return torch.cat([x[:1], x[:1] + region * (x[1:] - x[:1])])

    def blend_region(self, size: tuple[int, ...]) -> Tensor:
        """(R - 1, 1, *size): where each edit row may differ from the source, the union of the
        source's and that row's blend masks, from the maps recorded so far (all ones without a blend)."""
        if self._maps is None or not self._maps.sums:
            return torch.ones(max(self.rows - 1, 1), 1, *size)
        mask = self.blend_mask(size)  # (R, 1, *size)
        return torch.maximum(mask[:1], mask[1:])

    def blend_mask(self, size: tuple[int, ...]) -> Tensor:
        """(R, 1, *size) binary mask per row (`LocalBlend.__call__`): the cross-attention at the blend
        grid summed over the row's blend words, steps, layers and heads, max-pooled 3x3, upsampled
        (nearest) to `size`, divided by its maximum and thresholded. A row without blend words: 0."""
        grid = self._maps.nearest_grid(tuple(size), self.blend_scale)
        maps = self._maps.sums[grid]  # (R, L, *grid)
        words = torch.zeros(maps.shape[:2], device=maps.device)  # (R, L): the reference's alpha_layers
        for r, idx in enumerate(self.plan.blend):
            words[r, idx] = 1.0
        m = (maps * words.view(*words.shape, *[1] * len(grid))).sum(1, keepdim=True)  # (R, 1, *grid)
        m = F.interpolate(_max_pool(m), size=tuple(size), mode="nearest")  # (R, 1, *size)
        peak = m.flatten(1).amax(1).view(-1, *[1] * (m.dim() - 1))
        return (m / peak.clamp(min=torch.finfo(m.dtype).tiny) > self.blend_threshold).float()


def _pad(t: Tensor, length: int, value) -> Tensor:
    return F.pad(t, (0, length - t.shape[0]), value=value)


def _max_pool(m: Tensor) -> Tensor:
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[m.dim() - 2]
    return pool(m, kernel_size=3, stride=1, padding=1)
