"""Prompt-to-Prompt against its reference, google/prompt-to-prompt, computed here from what that code does.

The reference's pieces, written again in this file (never by calling attnlab's alignment or edit
maths): `seq_aligner.global_align` / `get_aligned_sequences` / `get_mapper` (Needleman-Wunsch with
gap 0, match 1, mismatch -1), `ptp_utils.get_time_words_attention_alpha` (the cross window over
T + 1 rows), the Stable Diffusion notebook's `AttentionControlEdit.forward` (cond half only, store
first, then edit; self maps replaced in the coarse layers), `AttentionReplace` (einsum with the
replacement mapper), `AttentionRefine` (`base[:, :, mapper] * alphas + edit * (1 - alphas)`),
`AttentionReweight` (`base * equalizer`, optionally over a refine) and `LocalBlend` (the blend words'
maps at the blend resolution, summed over words, averaged, 3x3 max-pooled, upsampled nearest,
divided by the maximum, thresholded at 0.3; `x_t = x_t[:1] + mask * (x_t - x_t[:1])` after every step).

One deviation is by design and stated where it enters: attnlab masks padding keys, so an edit row's
padding positions keep their zero attention (the reference's CLIP prompts have no masked tokens and
copy the source's padding columns one to one).
"""

from __future__ import annotations

import difflib
import random

import pytest
import torch
import torch.nn.functional as F
from control_toy import WordTokenizer
from models_util import perturbed, tiny_config
from torch import nn

from attnlab.attention import Attention, AttnCall, Control, name_layers
from attnlab.conditioning import Condition
from attnlab.control import PromptToPrompt, align_tokens
from attnlab.diffusion import make_scheduler, sample

ENC = WordTokenizer()
GAP, MATCH, MISMATCH = 0, 1, -1  # seq_aligner.ScoreParams(0, 1, -1) in get_mapper


# The reference's global alignment


def nw_mapping(x: list[str], y: list[str]) -> list[int]:
    """Per token of y, the aligned position in x or -1: the DP table first, then a trace back from
    the end that, as seq_aligner records it, prefers 'left' (a y token alone), then 'up' (an x token
    alone), then the diagonal (a pair) wherever the table allows several."""
    s = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(len(x) + 1):
        s[i][0] = i * GAP
    for j in range(len(y) + 1):
        s[0][j] = j * GAP
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            pair = MATCH if x[i - 1] == y[j - 1] else MISMATCH
            s[i][j] = max(s[i][j - 1] + GAP, s[i - 1][j] + GAP, s[i - 1][j - 1] + pair)
    out, i, j = {}, len(x), len(y)
    while i or j:
        if i == 0 or (j > 0 and s[i][j] == s[i][j - 1] + GAP):
            j -= 1
            out[j] = -1
        elif j == 0 or s[i][j] == s[i - 1][j] + GAP:
            i -= 1
        else:
            i, j = i - 1, j - 1
            out[j] = i
    return [out[k] for k in range(len(y))]


def difflib_mapping(x, y):
    out = [-1] * len(y)
    for a, b, n in difflib.SequenceMatcher(a=x, b=y, autojunk=False).get_matching_blocks():
        out[b : b + n] = range(a, a + n)
    return out


# Hand-made pairs; the expected mappings are what seq_aligner's functions return for them.
PAIRS = [
    ("[CLS] a red circle [SEP]", "[CLS] a big red circle [SEP]", [0, 1, -1, 2, 3, 4]),
    ("[CLS] a cat [SEP]", "[CLS] a dog [SEP]", [0, 1, -1, 3]),  # a changed word is new, not paired
    ("[CLS] a c [SEP]", "[CLS] c a [SEP]", [0, 2, -1, 3]),  # difflib pairs 'a' instead
    ("[CLS] a b a [SEP]", "[CLS] a [SEP]", [0, 1, 4]),
    ("[CLS] a red circle on grey [SEP]", "[CLS] a big red square on grey [SEP]", [0, 1, -1, 2, -1, 4, 5, 6]),
]


@pytest.mark.parametrize("src, dst, expected", PAIRS)
def test_alignment_is_the_reference_global_alignment_on_hand_made_pairs(src, dst, expected):
    src, dst = src.split(), dst.split()
    assert nw_mapping(src, dst) == expected  # the oracle itself, against seq_aligner's output
    mapper, alpha = align_tokens(src, dst)
    assert alpha.tolist() == [float(m >= 0) for m in expected]  # get_mapper: alphas = mapper != -1
    assert [m if a else -1 for m, a in zip(mapper.tolist(), alpha.tolist())] == expected


def test_alignment_matches_the_oracle_on_random_pairs_where_difflib_does_not():
    rng, vocab, differs = random.Random(0), "a b c d red circle".split(), 0
    for _ in range(300):
        x = ["[CLS]", *rng.choices(vocab, k=rng.randint(1, 6)), "[SEP]"]
        y = ["[CLS]", *rng.choices(vocab, k=rng.randint(1, 6)), "[SEP]"]
        mapper, alpha = align_tokens(x, y)
        assert [m if a else -1 for m, a in zip(mapper.tolist(), alpha.tolist())] == nw_mapping(x, y), (x, y)
        differs += difflib_mapping(x, y) != nw_mapping(x, y)
    assert differs > 30  # the old longest-block alignment would fail this test


# Replace, refine, reweight on hand-made probabilities


def _call(kind, grid, step, steps, roles=("uncond", "cond")):
    return AttnCall(
        "t", kind, grid, heads=2, step=step, num_steps=steps, timestep=None, roles=roles, layer=None
    )


def _probs(lengths, n_query, keys, seed=0, heads=2, blob=None):
    """(2R, heads, N, L): an uncond and a cond chunk, row r attending to its first lengths[r] keys.
    With blob=grid, token 2 is attended most in one corner region of the grid (row r: corner r)."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(2 * len(lengths), heads, n_query, keys, generator=g)
    if blob is not None:
        yy, xx = torch.meshgrid(torch.linspace(0, 1, blob[0]), torch.linspace(0, 1, blob[1]), indexing="ij")
        for r in range(len(lengths)):
            corner = (yy - r % 2) ** 2 + (xx - r % 2) ** 2  # distance to corner (0, 0) or (1, 1)
            logits[r :: len(lengths), :, :, 2] += 6 * (0.4 - corner.flatten()).clamp(min=0) / 0.4
    real = torch.arange(keys)[None, :] < torch.tensor(lengths * 2)[:, None]  # (2R, L)
    return logits.masked_fill(~real[:, None, None, :], float("-inf")).softmax(-1)


def _bound(tokens, **kw) -> PromptToPrompt:
    p2p = PromptToPrompt(**kw)
    p2p.bind(tokens, lambda r, w: [i for i, t in enumerate(tokens[r]) if t == w])
    return p2p


def cross_alpha(start, end, steps, edits, keys):
    """get_time_words_attention_alpha with one default window: (T + 1, E, 1, 1, L)."""
    alpha = torch.zeros(steps + 1, edits, keys)
    alpha[int(start * (steps + 1)) : int(end * (steps + 1))] = 1
    return alpha.view(steps + 1, edits, 1, 1, keys)


def refine_mapper(src, dsts, keys):
    """get_mapper per edit, padded to `keys`: mapper (E, L) with -1 for new tokens, alphas (E, 1, 1, L);
    the edit's padding positions get alpha 0 (masked keys, the stated deviation)."""
    mappers, alphas = torch.zeros(len(dsts), keys, dtype=torch.long), torch.zeros(len(dsts), keys)
    for e, dst in enumerate(dsts):
        m = torch.tensor(nw_mapping(src, dst))
        mappers[e, : len(dst)], alphas[e, : len(dst)] = m, (m != -1).float()
    return mappers, alphas.view(len(dsts), 1, 1, keys)


def reference_edit(attn, replace_cross, alpha_t, step):
    """AttentionControlEdit.forward on the cond rows (R, heads, N, L) of a cross call."""
    base, rep = attn[0], attn[1:]
    a = alpha_t[step]  # (E, 1, 1, L)
    return torch.cat([base[None], replace_cross(base, rep) * a + (1 - a) * rep])


SRC = "[CLS] a red circle on grey [SEP]".split()
STEPS = 10


def _check_cross(p2p, replace_cross, tokens, start, end, seed=0):
    keys = max(len(t) for t in tokens)
    p = _probs([len(t) for t in tokens], 16, keys, seed)
    alpha_t = cross_alpha(start, end, STEPS, len(tokens) - 1, keys)
    inject, acted = p2p.controls()[-1], []
    for step in range(STEPS):
        call = _call("cross", (4, 4), step, STEPS)
        out = inject.probs(call, p) if inject.active(call) else p
        cond = p[len(tokens) :]
        expected = reference_edit(cond, replace_cross, alpha_t, step)
        tol = 1e-5 * p.abs().max()
        torch.testing.assert_close(out[: len(tokens)], p[: len(tokens)], atol=0, rtol=0)  # uncond untouched
        torch.testing.assert_close(out[len(tokens) :], expected, atol=tol, rtol=0)
        if (expected - cond).abs().max() > 100 * tol:
            acted.append(step)
    return acted


def test_replace_is_the_reference_einsum_inside_the_reference_cross_window():
    tokens = [SRC, "[CLS] a blue circle on grey [SEP]".split(), "[CLS] a red square on grey [SEP]".split()]
    # Equal word and token counts, one token per word: get_replacement_mapper is the identity.
    mapper = torch.eye(len(SRC)).expand(2, -1, -1)

    def replace(base, rep):
        return torch.einsum("hpw,bwn->bhpn", base, mapper)

    p2p = _bound(tokens, mode="replace", cross_start=0.1, cross_end=0.35)
    # int(0.1 * 11) = 1 to int(0.35 * 11) = 3: steps 1 and 2 (step 3 is in [0.1, 0.35) of 10 steps)
    assert _check_cross(p2p, replace, tokens, 0.1, 0.35) == [1, 2]


def test_refine_is_the_reference_alignment_and_mix():
    tokens = [SRC, "[CLS] a big red square on grey [SEP]".split(), "[CLS] a circle [SEP]".split()]
    keys = max(len(t) for t in tokens)
    mapper, alphas = refine_mapper(SRC, tokens[1:], keys)

    def refine(base, rep):  # AttentionRefine.replace_cross_attention
        return base[:, :, mapper].permute(2, 0, 1, 3) * alphas + rep * (1 - alphas)

    p2p = _bound(tokens, mode="refine")  # the notebook's cross_replace_steps=0.8: int(0.8 * 11) = 8
    assert _check_cross(p2p, refine, tokens, 0.0, 0.8) == list(range(8))


def test_reweight_is_the_reference_equalizer_alone_and_over_a_refine():
    same = [SRC, SRC]
    equalizer = torch.ones(1, len(SRC))
    equalizer[:, SRC.index("red")] = 3.0  # get_equalizer(prompt, ("red",), (3.0,))

    def reweight(base, rep):  # AttentionReweight without a previous controller
        return base[None] * equalizer[:, None, None, :]

    p2p = _bound(same, mode="reweight", word="red", factor=3.0)
    assert _check_cross(p2p, reweight, same, 0.0, 0.8) == list(range(8))

    tokens = [SRC, "[CLS] a big red circle on grey [SEP]".split()]
    mapper, alphas = refine_mapper(SRC, tokens[1:], len(tokens[1]))
    eq = torch.ones(1, len(tokens[1]))
    eq[:, tokens[1].index("big")] = 3.0  # a new word: the equalizer scales the edit's own map

    def reweight_refined(base, rep):  # AttentionReweight(controller=AttentionRefine)
        refined = base[:, :, mapper].permute(2, 0, 1, 3) * alphas + rep * (1 - alphas)
        return refined * eq[:, None, None, :]

    p2p = _bound(tokens, mode="reweight", word="big", factor=3.0)
    assert _check_cross(p2p, reweight_refined, tokens, 0.0, 0.8) == list(range(8))


def test_self_maps_are_the_source_s_in_the_reference_window_and_coarse_layers_only():
    tokens = [SRC, "[CLS] a blue circle on grey [SEP]".split()]
    p2p = _bound(tokens, mode="replace", self_start=0.15, self_end=0.35)  # int(1.5)=1 .. int(3.5)=3
    inject = p2p.controls()[-1]
    for grid, replaced in (((16, 16), True), ((16, 17), False)):  # <= 16x16 queries (256 tokens)
        n = grid[0] * grid[1]
        p = _probs([n, n], n, n, seed=1)
        for step in range(STEPS):
            call = _call("self", grid, step, STEPS)
            out = inject.probs(call, p) if inject.active(call) else p
            expected = p.clone()
            if replaced and step in (1, 2):
                expected[3] = p[2]  # cond chunk: the edit row takes the source row's map
            assert torch.equal(out, expected), (grid, step)
    assert (p[3] - p[2]).abs().max() > 1e-3  # the replacement is visible


def test_no_injection_into_cross_scale_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attention(8, 2)
            self.cross = Attention(8, 2, context_dim=4)
            self.xscale = Attention(8, 2, context_dim=8, kind="xscale")
            name_layers(self)

    p2p = _bound([SRC, SRC], mode="replace")
    inject = p2p.controls()[-1]
    assert {m.kind for m in inject.select(Net())} == {"self", "cross"}
    assert not inject.active(_call("xscale", (4, 4), 0, STEPS))


# The local blend


def reference_blend_mask(stores, words, size, threshold=0.3):
    """LocalBlend.__call__'s mask: stores = the blend layers' cond maps summed over steps, each
    (R, heads, N, L) on a `grid`; words (R, L) = its alpha_layers. Returns (R, 1, *size) bool."""
    r, _, n, keys = stores[0].shape
    side = int(n**0.5)
    maps = torch.cat([m.reshape(r, -1, 1, side, side, keys) for m in stores], dim=1)
    maps = (maps * words.view(r, 1, 1, 1, 1, keys)).sum(-1).mean(1)  # (R, 1, side, side)
    mask = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
    mask = F.interpolate(mask, size=size)
    mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
    return mask > threshold


def _feed(rec, grids, tokens, steps=3, seed=0):
    """Record hand-made cond maps on layers with these grids; returns {grid: [per-layer step sums]}."""
    stores = {}
    for step in range(steps):
        for layer, grid in enumerate(grids):
            n = grid[0] * grid[1]
            p = _probs(
                [len(t) for t in tokens], n, max(len(t) for t in tokens), seed + 97 * step + layer, blob=grid
            )
            rec.probs(_call("cross", grid, step, steps), p)
            cond = p[len(tokens) :]
            stores.setdefault(grid, {}).setdefault(layer, 0)
            stores[grid][layer] = stores[grid][layer] + cond
    return {g: list(per_layer.values()) for g, per_layer in stores.items()}


def test_blend_mask_is_the_reference_local_blend_on_hand_made_maps():
    tokens = ["[CLS] a cat on grass [SEP]".split(), "[CLS] a dog on grass [SEP]".split()]
    p2p = _bound(tokens, mode="replace", blend=("cat", "dog"))
    rec = p2p.controls()[0]
    stores = _feed(rec, [(4, 4), (8, 8), (4, 4)], tokens)
    words = torch.zeros(2, len(tokens[0]))
    words[0, 2] = words[1, 2] = 1  # row 0 blends 'cat', row 1 'dog'
    size = (16, 16)  # the 4x4 maps are a quarter of the sample's side, as SD's 16x16 of 64x64
    expected = reference_blend_mask(stores[(4, 4)], words, size)
    mask = p2p.blend_mask(size)
    assert torch.equal(mask.bool(), expected)
    assert all(0 < m.sum() < m.numel() for m in mask)  # a real region, not all or nothing
    unpooled = F.interpolate(sum(s for s in stores[(4, 4)])[:, :, :, 2].mean(1).view(2, 1, 4, 4), size=size)
    assert not torch.equal(expected, unpooled / unpooled.amax((2, 3), keepdim=True) > 0.3)  # pooling shows

    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    region = (expected[:1] | expected[1:]).float()  # mask[:1] + mask[1:]
    torch.testing.assert_close(p2p.blend_latent(x), x[:1] + region * (x - x[:1]), atol=0, rtol=0)


def test_blend_reads_the_nearest_recorded_resolution_and_acts_from_blend_start():
    tokens = ["[CLS] a cat [SEP]".split(), "[CLS] a dog [SEP]".split()]
    p2p = _bound(tokens, mode="replace", blend=("cat", "dog"), blend_start=0.2)
    stores = _feed(p2p.controls()[0], [(8, 8), (2, 2)], tokens)
    words = torch.zeros(2, 4)
    words[:, 2] = 1
    # No 4x4 maps: 8x8 (x2) and 2x2 (x1/2) are equally far from a quarter side; the finer one wins.
    assert torch.equal(p2p.blend_mask((16, 16)).bool(), reference_blend_mask(stores[(8, 8)], words, (16, 16)))
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(p2p.after_step(x, 1, 10), x)  # null-text's start_blend: after step int(0.2*10)
    assert not torch.equal(p2p.after_step(x, 2, 10), x)


# End to end on a small U-Net: the reference edit written as a control here


class ReferenceEdit(Control):
    """AttentionStore + AttentionControlEdit + AttentionReplace / AttentionRefine on the cond chunk
    of every self and cross layer, with the reference's step counting read from the bus."""

    def __init__(self, mode, tokens, steps, cross_end=0.8, self_end=0.4, self_max=256):
        self.mode, self.keys = mode, max(len(t) for t in tokens)
        self.mapper, self.alphas = refine_mapper(tokens[0], tokens[1:], self.keys)
        self.alpha_t = cross_alpha(0.0, cross_end, steps, len(tokens) - 1, self.keys)
        self.self_steps = range(0, int(steps * self_end))
        self.self_max, self.store = self_max, {}

    def active(self, call):
        return set(call.roles) <= {"uncond", "cond"}

    def needs_probs(self, call):
        return call.kind == "cross" or self._self_replaced(call)

    def _self_replaced(self, call):
        return (
            call.kind == "self"
            and call.step in self.self_steps
            and call.grid[0] * call.grid[1] <= self.self_max
        )

    def probs(self, call, p):
        sl = call.chunk(p, "cond")
        attn = p[sl]
        if call.kind == "cross":
            self.store[call.name] = self.store.get(call.name, 0) + attn  # stored before the edit
            new = reference_edit(attn, self._replace_cross, self.alpha_t, call.step)
        elif self._self_replaced(call):
            new = attn[:1].expand_as(attn)
        else:
            return p
        p = p.clone()
        p[sl] = new
        return p

    def _replace_cross(self, base, rep):
        if self.mode == "replace":  # one token per word: the replacement mapper is the identity
            return torch.einsum("hpw,bwn->bhpn", base, torch.eye(self.keys).to(base).expand(len(rep), -1, -1))
        return base[:, :, self.mapper].permute(2, 0, 1, 3) * self.alphas + rep * (1 - self.alphas)


class ReferenceBlend:
    """LocalBlend as the sampling loop's plug-in: after every step (the latent entering step i >= 1),
    from the given layers' stored maps."""

    def __init__(self, ctrl, words, layers, threshold=0.3):
        self.ctrl, self.words, self.layers, self.threshold = ctrl, words, layers, threshold

    def controls(self):
        return [self.ctrl]

    def active(self, i, steps):
        return False

    def prepare(self, model, x, t, cond, ctx):
        return x if ctx["i"] == 0 else self(x)

    def __call__(self, x_t):
        stores = [self.ctrl.store[n] for n in self.layers]
        mask = reference_blend_mask(stores, self.words, tuple(x_t.shape[2:]), self.threshold)
        mask = (mask[:1] + mask[1:]).float()
        return x_t[:1] + mask * (x_t - x_t[:1])


@pytest.fixture(scope="module")
def unet(one_thread):
    # 16 px, attention at 8 and 4 px: the 4x4 maps are at SD's 16x16-of-64x64 ratio
    cfg = tiny_config(
        "unet", 2, "text", in_channels=1, context_dim=ENC.dim, channel_mult=(1, 1, 1), attn_resolutions=(8, 4)
    )
    # weights far enough from init for peaked maps; float64, as kernel rounding (a batch of 3 against 2
    # picks other kernels) grows through the DDIM steps to 1e-4 of the output in float32
    return perturbed(cfg, seed=4, scale=0.5).eval().double()


PROMPTS = ["a red circle on grey", "a big red square on grey"]
# The 4x4 cross layers, the mid block's among them: attnlab picks the blend maps by resolution (in
# SD the reference's down_cross[2:4] + up_cross[:3] are all its 16x16 ones; its mid block is 8x8).
QUARTER = ["down.4.attn.cross", "up.0.attn.cross", "up.1.attn.cross", "mid.attn.cross"]


NOISE = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(11), dtype=torch.float64)


def _draw(model, prompts, guidances=(), steps=5):
    """Every row from the same noise, as Prompt-to-Prompt samples source and edits (float64)."""
    c = ENC.condition(prompts)
    cond = Condition(tokens=c.tokens.double(), mask=c.mask)
    x_T = NOISE.expand(len(prompts), -1, -1, -1)
    sched = make_scheduler("ddim")
    return sample(
        model, x_T.shape, cond, scheduler=sched, steps=steps, guidance=3.0, x_T=x_T, guidances=guidances
    )


def _edit(model, prompts, p2p, steps=5):
    """`attnlab.control.edit.edit`'s steps, on float64 noise: bind, sample, blend after the last step."""
    p2p.bind([ENC.tokens_of(p) for p in prompts], lambda r, w: ENC.word_token_indices(prompts[r], w))
    return p2p.after_step(_draw(model, prompts, [p2p], steps), steps - 1, steps)


@pytest.mark.parametrize(
    "mode, prompts", [("refine", PROMPTS), ("replace", ["a red circle on grey", "a red square on grey"])]
)
def test_edit_with_local_blend_equals_the_reference_edit_end_to_end(unet, mode, prompts):
    steps, threshold = 5, 0.5  # above the reference's 0.3: this untrained model's maps are flatter than SD's
    tokens = [ENC.tokens_of(p) for p in prompts]
    words = torch.zeros(2, max(len(t) for t in tokens))
    words[0, tokens[0].index("circle")] = words[1, tokens[1].index("square")] = 1
    ctrl = ReferenceEdit(mode, tokens, steps, self_max=16)  # 16 = 4x4: the reference's 16x16 at this scale
    blend = ReferenceBlend(ctrl, words, QUARTER, threshold)
    ref = blend(_draw(unet, prompts, [blend], steps))  # step_callback after the last step too
    p2p = PromptToPrompt(mode=mode, blend=("circle", "square"), blend_threshold=threshold, self_max_tokens=16)
    ours = _edit(unet, prompts, p2p, steps)
    tol = 1e-5 * ref.abs().max()
    torch.testing.assert_close(ours, ref, atol=tol, rtol=0)
    region = reference_blend_mask([ctrl.store[n] for n in QUARTER], words, (16, 16), threshold)
    assert 0 < (region[:1] | region[1:]).sum() < 256  # the blend keeps part of the source
    alone = _draw(unet, prompts[1:], steps=steps)
    assert (ours[1] - alone[0]).abs().max() > 100 * tol  # not the edit prompt sampled on its own
    unblended = _edit(unet, prompts, PromptToPrompt(mode=mode, self_max_tokens=16), steps)
    assert (ours[1] - unblended[1]).abs().max() > 100 * tol  # the blend did something


def test_each_edit_equals_itself_edited_alone(unet):
    edits = ["a big red circle on grey", "a red square on grey"]
    kw = dict(mode="refine", blend=("circle", "square"), blend_threshold=0.5)
    both = _edit(unet, [PROMPTS[0], *edits], PromptToPrompt(**kw))
    tol = 1e-5 * both.abs().max()
    for r, e in enumerate(edits, start=1):
        alone = _edit(unet, [PROMPTS[0], e], PromptToPrompt(**kw))
        torch.testing.assert_close(both[r], alone[1], atol=tol, rtol=0)
        torch.testing.assert_close(both[0], alone[0], atol=tol, rtol=0)
    assert (both[1] - both[2]).abs().max() > 100 * tol and (both[1] - both[0]).abs().max() > 100 * tol
