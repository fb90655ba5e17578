"""The controls act the same on the real backbones: U-Net and DiT, images and audio."""

import pytest
import torch
from control_toy import WordTokenizer

from attnlab.attention import attention_layers, control
from attnlab.control import PAG, SAG, HeatMaps, PromptToPrompt, TGate
from attnlab.diffusion import make_scheduler, sample
from attnlab.models import build_model, preset

ENC = WordTokenizer()
PROMPTS = ["a red circle", "a red circle"]


def _model(backbone, dims):
    name = "unet-tiny" if backbone == "unet" else "dit-tiny"
    extra = {"depth": 2, "width": 24} if backbone == "dit" else {}
    cfg = preset(name, dims=dims, size=16, in_channels=1, cond="text", context_dim=ENC.dim, **extra)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # zero-initialised output layers would hide every attention effect
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _sample(model, dims, guidances=(), steps=3):
    shape = (2, 1, *([16] * dims))
    cond = ENC.condition(PROMPTS)
    return sample(
        model,
        shape,
        cond,
        scheduler=make_scheduler("ddim"),
        steps=steps,
        seeds=[3, 3],
        guidance=2.0,
        guidances=guidances,
    )


@pytest.mark.parametrize("backbone, dims", [("unet", 2), ("unet", 1), ("dit", 2), ("dit", 1)])
def test_controls_on_backbone(backbone, dims):
    model = _model(backbone, dims)
    ref = _sample(model, dims)
    assert not torch.equal(_sample(model, dims, [PAG(scale=1.0), SAG(scale=0.5)]), ref)
    p2p = PromptToPrompt(mode="replace")
    p2p.bind([ENC.tokens_of(p) for p in PROMPTS], lambda r, w: ENC.word_token_indices(PROMPTS[r], w))
    hm, tg = HeatMaps(), TGate(gate=0.5)
    with control(model, [hm, tg]):
        edited = _sample(model, dims, [p2p])
    assert torch.equal(edited[0], edited[1])
    n_cross = sum(m.kind == "cross" for m in attention_layers(model).values())
    assert tg.skipped["cross"] == n_cross * 1 and hm.count == n_cross * 2  # gate at step 2 of 3
    size = (16,) * dims
    maps = hm.word_map(ENC.word_token_indices(PROMPTS[0], "circle"), size)
    assert (
        maps.shape == (2, *size)
        and (maps >= 0).all()
        and torch.allclose(maps.flatten(1).amax(1), torch.ones(2))
    )
