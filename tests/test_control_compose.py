"""Controls compose on the same layers without interfering, and the fused kernel stays where it can."""

import pytest
import torch
import torch.nn.functional as F
from control_toy import WordTokenizer, toy
from torch import nn

import attnlab.attention.core as core
from attnlab.attention import Attention, attention_layers, control, name_layers, sampling_step
from attnlab.control import PAG, SAG, AttendExcite, AttnCache, HeatMaps, PromptToPrompt, TGate
from attnlab.diffusion import make_scheduler, sample
from attnlab.techniques import techniques

ENC = WordTokenizer()
PROMPTS = ["a red circle", "a blue square"]


def _sample(model, controls=(), guidances=(), guidance=3.0, steps=4):
    cond = ENC.condition(PROMPTS)
    with control(model, list(controls)):
        return sample(
            model,
            (2, 1, 8, 8),
            cond,
            scheduler=make_scheduler("ddim"),
            steps=steps,
            seeds=[0, 1],
            guidance=guidance,
            guidances=guidances,
        )


def _kernel_log(monkeypatch, model):
    """Which kernel ran, on which pass: the fused SDPA or the explicit softmax."""
    log = []
    sdpa, probs = F.scaled_dot_product_attention, core.attention_probs

    def fused(q, k, v, **kw):
        log.append(("sdpa", model.bus_state.roles, q.shape[-2] != k.shape[-2]))
        return sdpa(q, k, v, **kw)

    def explicit(q, k, mask):
        log.append(("math", model.bus_state.roles, q.shape[-2] != k.shape[-2]))
        return probs(q, k, mask)

    monkeypatch.setattr(F, "scaled_dot_product_attention", fused)
    monkeypatch.setattr(core, "attention_probs", explicit)
    return log


def test_fused_kernel_stays_on_layers_no_control_needs_maps(monkeypatch):
    model = toy()
    log = _kernel_log(monkeypatch, model)
    _sample(model, controls=[HeatMaps(), TGate(gate=0.5)], guidances=[PAG(scale=1.0, layers="**")], steps=2)
    main = {(kernel, cross) for kernel, roles, cross in log if roles == ("uncond", "cond")}
    pag = {(kernel, cross) for kernel, roles, cross in log if roles == ("pag",)}
    assert main == {("sdpa", False), ("math", True)}  # only the mapped cross layers use the math path
    assert pag == {("sdpa", True)}  # the perturbed pass: identity self maps need no kernel, cross is fused
    log.clear()
    _sample(model, controls=[AttnCache(every=2)], guidances=[PAG(scale=1.0, layers="mid")], steps=2)
    assert log and all(kernel == "sdpa" for kernel, _, _ in log)


def test_extra_passes_leave_heat_maps_alone():
    model = toy()
    hm, pag, sag = HeatMaps(), PAG(scale=2.0), SAG(scale=1.0)
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([600, 600]), ENC.condition(PROMPTS)
    ctx = {"i": 0, "steps": 4, "alpha_bar_t": torch.full((2, 1, 1, 1), 0.5), "prediction_type": "epsilon"}
    with control(model, [hm, *pag.controls(), *sag.controls()]):
        with sampling_step(model, 0, 4, t, roles=("cond",)):
            out = {"cond": model(x, t, cond)}
            recorded = {g: m.clone() for g, m in hm.sums.items()}
            pag.correction(model, x, t, cond, out, ctx)
            sag.correction(model, x, t, cond, out, ctx)
    assert hm.count == 3 and all(torch.equal(hm.sums[g], m) for g, m in recorded.items())


def test_heat_maps_with_tgate_are_the_maps_before_the_gate():
    model = toy()
    gated, tgate, before = HeatMaps(), TGate(gate=0.5), HeatMaps(end=0.5)
    _sample(model, controls=[gated, tgate])
    _sample(model, controls=[before])
    assert gated.count == before.count == tgate.gate_step(4) * 3  # gated steps leave nothing to map
    torch.testing.assert_close(gated.maps((8, 8)), before.maps((8, 8)), atol=1e-6, rtol=0)


def test_pag_result_is_the_same_with_heat_maps_and_sag_maps_recorded():
    model = toy()
    ref = _sample(model, guidances=[PAG(scale=2.0)])
    out = _sample(model, controls=[HeatMaps()], guidances=[PAG(scale=2.0), SAG(scale=0.0)])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_cache_and_tgate_on_the_same_layers_compose():
    model = toy()
    tg, cache = TGate(gate=0.5), AttnCache(every=2, kind="self", start=0.0)
    out = _sample(model, controls=[tg, cache], guidances=[PAG(scale=1.0)])
    assert torch.isfinite(out).all() and tg.skipped["cross"] > 0 and cache.hits > 0
    assert all(not layer.controls for layer in attention_layers(model).values())


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Attention(8, 2) for _ in range(12)])
        name_layers(self)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: PAG(layers=p).controls()[0],
        lambda p: SAG(layers=p).controls()[0],
        lambda p: AttnCache(layers=p, kind="self"),
    ],
)
def test_layer_patterns_select_whole_parts(make):
    net = Deep()
    assert [m.name for m in make("blocks.1").select(net)] == ["blocks.1"]
    assert [m.name for m in make(("blocks.1*",)).select(net)] == ["blocks.1", "blocks.10", "blocks.11"]


def test_every_registered_control_runs_in_the_loop_and_leaves_no_state():
    model = toy()
    prompts = [PROMPTS[0], PROMPTS[0]]
    built = [
        t for t in techniques() if t.training_free and t.options.__module__.startswith("attnlab.control")
    ]
    assert {t.name for t in built} >= {
        "tgate",
        "attn_cache",
        "pag",
        "sag",
        "p2p",
        "attend_excite",
        "heatmaps",
    }
    for tech in built:
        obj = tech.build()
        if isinstance(obj, PromptToPrompt):
            obj.bind([ENC.tokens_of(p) for p in prompts], lambda r, w: ENC.word_token_indices(prompts[r], w))
        if isinstance(obj, AttendExcite):
            obj.bind([[3], [3]], [(1, 4), (1, 4)])
        is_guidance = hasattr(obj, "controls")
        out = _sample(
            model, controls=[] if is_guidance else [obj], guidances=[obj] if is_guidance else [], steps=3
        )
        assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all(), tech.name
        assert all(not layer.controls for layer in attention_layers(model).values()), tech.name


def test_token_merging_pag_and_heat_maps_share_layers():
    tome = next((t for t in techniques() if t.name == "tome"), None)
    if tome is None:
        pytest.skip("token merging is not registered")
    model = toy()
    merge, hm = tome.build(ratio=0.5, layers="blocks.*"), HeatMaps()
    ref = _sample(model, guidances=[PAG(scale=2.0)])
    out = _sample(model, controls=[merge, hm], guidances=[PAG(scale=2.0)])
    assert torch.isfinite(out).all() and not torch.equal(out, ref)  # merging changed the self-attention
    assert hm.count == 4 * 3  # cross-attention maps stay whole next to merged self-attention
