"""Every sampling-time control at its neutral setting leaves the samples unchanged."""

import pytest
import torch
from control_toy import WordTokenizer, toy

from attnlab.attention import control
from attnlab.control import PAG, SAG, AttendExcite, AttnCache, HeatMaps, PromptToPrompt, TGate
from attnlab.diffusion import make_scheduler, sample

ENC = WordTokenizer()
PROMPTS = ["a red circle", "a blue square"]


def _sample(model, prompts=PROMPTS, guidance=3.0, prediction="epsilon", **kw):
    cond = ENC.condition(prompts)
    sched = make_scheduler("ddim", prediction_type=prediction)
    shape = (len(prompts), 1, 8, 8)
    return sample(
        model, shape, cond, scheduler=sched, steps=5, seeds=[0] * len(prompts), guidance=guidance, **kw
    )


@pytest.fixture(scope="module")
def model():
    return toy()


@pytest.fixture(scope="module")
def base(model):
    return _sample(model)


@pytest.mark.parametrize("guidance", [PAG(scale=0.0), SAG(scale=0.0), AttendExcite(step_size=0.0)])
def test_guidance_at_zero_scale_is_exact(model, base, guidance):
    if isinstance(guidance, AttendExcite):
        guidance.bind([[2], [2]], [(1, 4), (1, 4)])
    assert torch.equal(_sample(model, guidances=[guidance]), base)


# T-GATE with gate 1.0 still caches self-attention before the gate (every sp_interval steps): off here
NEVER_REUSE = [
    TGate(gate=1.0, sp_interval=1),
    AttnCache(every=1),
    TGate(gate=1.0, sp_interval=1, fi_interval=2),
]


@pytest.mark.parametrize("ctrl", NEVER_REUSE)
def test_step_controls_that_never_reuse_are_exact(model, base, ctrl):
    with control(model, ctrl):
        assert torch.equal(_sample(model), base)


def test_tgate_gate_after_last_step_with_drop_cfg_is_exact(model, base):
    tg = TGate(gate=1.0, sp_interval=1, drop_cfg=True)
    with control(model, tg):
        out = _sample(model, guidance=tg.guidance_schedule(3.0))
    assert torch.equal(out, base) and tg.skipped["cross"] == 0


def test_heatmaps_only_observe(model, base):
    with control(model, HeatMaps()):
        out = _sample(model)
    torch.testing.assert_close(out, base, atol=1e-4, rtol=0)  # the math path: float error only


def test_p2p_reweight_factor_one_reproduces_source(model):
    prompts = [PROMPTS[0], PROMPTS[0]]
    p2p = PromptToPrompt(mode="reweight", word="red", factor=1.0)
    p2p.bind([ENC.tokens_of(t) for t in prompts], lambda r, w: ENC.word_token_indices(prompts[r], w))
    out = _sample(model, prompts, guidances=[p2p])
    alone = _sample(model, prompts[:1])
    assert torch.equal(out[1], out[0])
    torch.testing.assert_close(out[0], alone[0], atol=1e-4, rtol=0)


def test_v_prediction_guidance_at_zero_scale(model):
    ref = _sample(model, prediction="v_prediction")
    out = _sample(model, prediction="v_prediction", guidances=[SAG(scale=0.0), PAG(scale=0.0)])
    assert torch.equal(out, ref)
