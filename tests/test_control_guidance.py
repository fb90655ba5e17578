"""PAG and SAG: the perturbed and degraded passes, and their combination with classifier-free guidance."""

import pytest
import torch
from control_toy import WordTokenizer, toy

from attnlab.attention import Attention, attention_layers, control, sampling_step
from attnlab.control import PAG, SAG, identity_attention
from attnlab.control.common import gaussian_blur
from attnlab.diffusion import make_scheduler, sample

ENC = WordTokenizer()


def _sample(model, guidance=3.0, **kw):
    cond = ENC.condition(["a red circle", "a blue square"])
    return sample(
        model,
        (2, 1, 8, 8),
        cond,
        scheduler=make_scheduler("ddim"),
        steps=4,
        seeds=[0, 1],
        guidance=guidance,
        **kw,
    )


def test_identity_attention_equals_the_math_path_with_an_identity_map():
    torch.manual_seed(0)
    layer, x = Attention(16, heads=2, qkv_bias=True), torch.randn(2, 5, 16)
    v = layer.project(x, None)[2]  # (B, heads, N, d)
    eye = torch.eye(5).expand(2, 2, 5, 5)
    expected = layer.to_out((eye @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(identity_attention(layer, x), expected)


def test_pag_perturbs_only_its_own_pass_and_only_chosen_layers():
    model = toy()
    pag = PAG(scale=2.0, layers="mid")
    qkv = []  # self-attention layers that computed q, k, v (an identity map needs only v)
    for layer in attention_layers(model).values():
        if layer.kind == "self":
            layer.to_qkv.register_forward_hook(
                lambda m, i, o, n=layer.name: qkv.append((n, model.bus_state.roles))
            )
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([500, 500]), ENC.condition(["a", "b"])
    with control(model, pag.controls()):
        with sampling_step(model, 0, 4, t, roles=("cond",)):
            plain = model(x, t, cond)
            corr = pag.correction(model, x, t, cond, {"cond": plain}, {"i": 0, "steps": 4})
        assert model.bus_state.roles == ("cond",)  # the extra pass restored the bus state
    assert corr.abs().max() > 0
    on_pag = {n for n, roles in qkv if roles == ("pag",)}
    assert on_pag == {"blocks.0.attn1", "blocks.1.attn1"}  # mid.attn1 was the identity
    assert {n for n, roles in qkv if roles == ("cond",)} == on_pag | {"mid.attn1"}
    torch.testing.assert_close(model(x, t, cond), plain)  # the cond pass itself was not perturbed


def test_pag_and_sag_change_samples_and_combine_with_cfg():
    model = toy()
    ref = _sample(model)
    pag = _sample(model, guidances=[PAG(scale=2.0)])
    sag = _sample(model, guidances=[SAG(scale=1.0)])
    both = _sample(model, guidances=[PAG(scale=2.0), SAG(scale=1.0)])
    no_cfg = _sample(model, guidance=1.0, guidances=[PAG(scale=2.0)])
    for out in (pag, sag, both, no_cfg):
        assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert not torch.equal(both, pag) and not torch.equal(both, sag)


def test_pag_step_window_limits_the_extra_passes():
    model = toy()
    pag = PAG(scale=2.0, start=0.5, end=1.0)
    seen = []
    model.head.register_forward_hook(
        lambda m, i, o: seen.append((model.bus_state.step, model.bus_state.roles))
    )
    _sample(model, guidances=[pag])
    assert sorted(s for s, r in seen if r == ("pag",)) == [2, 3]


@pytest.mark.parametrize("branch", ["uncond", "cond"])
def test_sag_mask_marks_tokens_with_above_average_attention(branch):
    model = toy()
    sag = SAG(scale=1.0, layers="blocks.0", branch=branch)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([500] * 4)
    cond = ENC.condition(["a", "b"])
    both = type(cond).cat([cond.null_like(), cond])
    with control(model, sag.controls()):
        with sampling_step(model, 0, 4, t, roles=("uncond", "cond")):
            model(x, t, both)
    mass = sag._recorder.mass["blocks.0.attn1"]
    assert mass.shape == (2, 8, 8)  # the branch's rows only, on the layer's grid
    layer = attention_layers(model)["blocks.0.attn1"]
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    model(x, t, both)
    p = layer.forward_math(seen[0])[1]  # (4, heads, 64, 64), rows [uncond; cond]
    rows = slice(0, 2) if branch == "uncond" else slice(2, 4)
    torch.testing.assert_close(mass.flatten(1), p[rows].mean(1).sum(1))
    torch.testing.assert_close(mass.flatten(1).sum(1), torch.full((2,), 64.0))  # each query spreads mass 1
    mask = sag.mask((8, 8))
    assert mask.shape == (2, 1, 8, 8) and torch.equal(mask[:, 0], (mass > 1).float())


def test_gaussian_blur_keeps_constants_and_mean():
    x = torch.full((1, 1, 9, 9), 3.0)
    torch.testing.assert_close(gaussian_blur(x, 1.0), x)
    spike = torch.zeros(1, 1, 21)
    spike[..., 10] = 1
    blurred = gaussian_blur(spike, 1.5)
    torch.testing.assert_close(blurred.sum(), torch.tensor(1.0))
    assert blurred[..., 10] < 1 and blurred[..., 8] > 0
