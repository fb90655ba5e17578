"""Prompt-to-Prompt: exact reproduction, the source row untouched, alignment, reweighting, local blend."""

import pytest
import torch
from control_toy import WordTokenizer, toy

from attnlab.attention import Control, control
from attnlab.control import PromptToPrompt, align_tokens
from attnlab.diffusion import make_scheduler, sample
from attnlab.errors import ConfigError

ENC = WordTokenizer()
SRC = "a red circle on grey"


def _edit(model, prompts, p2p=None, steps=5):
    cond = ENC.condition(prompts)
    guidances = []
    if p2p is not None:
        p2p.bind([ENC.tokens_of(t) for t in prompts], lambda r, w: ENC.word_token_indices(prompts[r], w))
        guidances = [p2p]
    n = len(prompts)
    out = sample(
        model,
        (n, 1, 8, 8),
        cond,
        scheduler=make_scheduler("ddim"),
        steps=steps,
        seeds=[7] * n,
        guidance=3.0,
        guidances=guidances,
    )
    return out if p2p is None else p2p.blend_latent(out)


@pytest.fixture(scope="module")
def model():
    return toy(seed=1)


@pytest.mark.parametrize(
    "mode, kw", [("replace", {}), ("refine", {}), ("reweight", {"word": "red", "factor": 1.0})]
)
def test_edit_equal_to_source_reproduces_the_source_exactly(model, mode, kw):
    out = _edit(model, [SRC, SRC], PromptToPrompt(mode=mode, **kw))
    assert torch.equal(out[1], out[0])


class MapRecorder(Control):
    """Installed after Prompt-to-Prompt: sees the maps the injection left, per layer and step."""

    def __init__(self):
        self.seen = []

    def active(self, call):
        return "cond" in call.roles

    def needs_probs(self, call):
        return True

    def probs(self, call, p):
        self.seen.append((call.kind, call.step, p[call.chunk(p, "cond")].clone()))
        return p


def test_edit_rows_get_the_source_maps_inside_the_windows(model):
    prompts = [SRC, "a blue circle on grey", "a red square on grey"]
    p2p = PromptToPrompt(mode="replace", cross_end=0.6, self_end=0.4)
    p2p.bind([ENC.tokens_of(t) for t in prompts], lambda r, w: ENC.word_token_indices(prompts[r], w))
    rec = MapRecorder()
    cond = ENC.condition(prompts)
    with control(model, [*p2p.controls(), rec]):
        out = sample(
            model, (3, 1, 8, 8), cond, scheduler=make_scheduler("ddim"), steps=5, seeds=[7] * 3, guidance=3.0
        )
    for kind, step, p in rec.seen:  # windows: cross steps 0-2 (0.6 * 5), self steps 0-1
        injected = step < (3 if kind == "cross" else 2)
        assert torch.equal(p[1], p[0]) == injected and torch.equal(p[2], p[0]) == injected
    torch.testing.assert_close(out[0], _edit(model, [SRC])[0], atol=1e-4, rtol=0)  # the source is untouched


def test_replace_needs_equal_token_counts(model):
    with pytest.raises(ConfigError, match="equal token counts.*use mode='refine'"):
        _edit(model, [SRC, "a big red circle on grey"], PromptToPrompt(mode="replace"))


def test_alignment_maps_kept_tokens_and_marks_new_ones():
    src = ["[CLS]", "a", "red", "circle", "[SEP]"]
    dst = ["[CLS]", "a", "big", "red", "circle", "[SEP]"]
    mapper, alpha = align_tokens(src, dst)
    assert alpha.tolist() == [1, 1, 0, 1, 1, 1]
    assert mapper[alpha.bool()].tolist() == [0, 1, 2, 3, 4]


def test_refine_and_reweight_change_the_edit_only(model):
    refined = _edit(model, [SRC, "a big red circle on grey"], PromptToPrompt(mode="refine"))
    boosted = _edit(model, [SRC, SRC], PromptToPrompt(mode="reweight", word="red", factor=4.0))
    alone = _edit(model, [SRC])
    for out in (refined, boosted):
        torch.testing.assert_close(out[0], alone[0], atol=1e-4, rtol=0)
        assert not torch.allclose(out[1], out[0], atol=1e-3)


def test_local_blend_keeps_the_source_outside_the_mask(model):
    # blend_scale=1: the toy's full-resolution maps (its half-resolution ones are nearly flat)
    p2p = PromptToPrompt(mode="replace", blend=("circle",), blend_threshold=0.97, blend_scale=1.0)
    out = _edit(model, [SRC, "a blue circle on grey"], p2p)
    mask = p2p.blend_mask((8, 8))
    region = torch.maximum(mask[:1], mask[1:])[0, 0].bool()  # (8, 8)
    assert 0 < region.sum() < 64
    torch.testing.assert_close(out[1][:, ~region], out[0][:, ~region])
    assert not torch.allclose(out[1][:, region], out[0][:, region])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"mode": "swap"}, "mode='swap' is not one of"),
        ({"mode": "reweight"}, "needs word="),
        ({"cross_end": 2.0}, "p2p cross"),
    ],
)
def test_bad_options(kw, match):
    with pytest.raises(ConfigError, match=match):
        PromptToPrompt(**kw)


def test_batch_must_match_the_bound_prompts(model):
    p2p = PromptToPrompt()
    p2p.bind([ENC.tokens_of(SRC)] * 3, lambda r, w: [])
    cond = ENC.condition([SRC, SRC])
    with pytest.raises(ConfigError, match="bound to 3 prompts but the batch has 2"):
        sample(
            model,
            (2, 1, 8, 8),
            cond,
            scheduler=make_scheduler("ddim"),
            steps=2,
            seeds=[0, 0],
            guidances=[p2p],
        )
