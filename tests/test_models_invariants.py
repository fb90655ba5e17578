"""Model-level invariants: adaLN-Zero identity at init, stable layer names, the padding mask, the
null condition, and the math attention path equal to SDPA inside whole models."""

import pytest
import torch
from models_util import CTX, inputs, perturbed, tiny_config

from attnlab.attention import Control, attention_layers, control
from attnlab.conditioning import Condition
from attnlab.models import build_model
from attnlab.models.blocks import TransformerBlock
from attnlab.models.specs import AttnSpec

pytestmark = pytest.mark.usefixtures("one_thread")

BACKBONES = ["unet", "dit"]


# adaLN-Zero


def _block_inputs(dim=32, emb=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(2, 10, dim, generator=g), torch.randn(2, emb, generator=g)
    ctx = (torch.randn(2, 4, CTX, generator=g), torch.ones(2, 4, dtype=torch.bool))
    return x, c, ctx


@pytest.mark.parametrize("modulation", ["adaln_zero", "none"])
def test_transformer_block_is_identity_at_init(modulation):
    spec = AttnSpec(heads=4, cross_attn=True, mlp_ratio=2.0, modulation=modulation)
    block = TransformerBlock(32, spec, emb_dim=24, context_dim=CTX)
    x, c, ctx = _block_inputs()
    assert torch.equal(block(x, c, ctx, (2, 5)), x)
    with torch.no_grad():  # and it is the init that does it: a trained block is not the identity
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert not torch.allclose(block(x, c, ctx, (2, 5)), x)


@pytest.mark.parametrize("dims", [2, 1])
def test_dit_blocks_are_identity_and_output_zero_at_init(dims):
    cfg = tiny_config("dit", dims, "text")
    torch.manual_seed(0)
    model = build_model(cfg)
    x, t, cond = inputs(cfg)
    c, ctx = model.embed(t, cond, x.shape[0])
    assert c.abs().sum() > 0  # the conditioning vector is not zero: the zeros come from adaLN-Zero
    h = torch.randn(x.shape[0], model.pos.shape[1], cfg.width)
    for blk in model.blocks:
        assert torch.equal(blk(h, c, ctx, model.grid), h)
    assert torch.equal(model(x, t, cond), torch.zeros_like(x))


# Names


@pytest.mark.parametrize("backbone", BACKBONES)
def test_layer_names_are_stable_module_paths(backbone):
    cfg = tiny_config(backbone, 2, "text")
    a, b = build_model(cfg), build_model(cfg)
    names = list(attention_layers(a))
    assert names == list(attention_layers(b)) and len(set(names)) == len(names)
    for name, layer in attention_layers(a).items():
        assert a.get_submodule(name) is layer
        assert name.split(".")[-1] == layer.kind  # "...self" / "...cross"
    assert names == list(attention_layers(build_model(tiny_config(backbone, 1, "text"))))


# Padding mask and null condition


@pytest.mark.parametrize("backbone", BACKBONES)
def test_padded_text_tokens_change_nothing(backbone):
    cfg = tiny_config(backbone, 2, "text")
    model = perturbed(cfg)
    x, t, cond = inputs(cfg)
    ref = model(x, t, cond)
    garbage = cond.tokens.clone()
    garbage[0, 2:] = 1e3 * torch.randn(3, CTX)  # row 0's padding
    torch.testing.assert_close(model(x, t, cond.replace(tokens=garbage)), ref, atol=1e-5, rtol=1e-5)
    real = cond.tokens.clone()
    real[0, 1] += 1.0  # a real token does matter
    assert not torch.allclose(model(x, t, cond.replace(tokens=real))[0], ref[0], atol=1e-4)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_null_label_is_the_unconditional_path(backbone):
    cfg = tiny_config(backbone, 2, "class")
    model = perturbed(cfg)
    x, t, _ = inputs(cfg)
    null = Condition(labels=torch.full((3,), -1))
    torch.testing.assert_close(model(x, t, null), model(x, t, None))
    assert not torch.allclose(
        model(x, t, null), model(x, t, Condition(labels=torch.zeros(3, dtype=torch.long)))
    )


@pytest.mark.parametrize("backbone", BACKBONES)
def test_null_text_is_the_unconditional_path(backbone):
    cfg = tiny_config(backbone, 1, "text")
    model = perturbed(cfg)
    x, t, cond = inputs(cfg)
    uncond = model(x, t, None)
    torch.testing.assert_close(model(x, t, cond.null_like()), uncond)
    assert not torch.allclose(model(x, t, cond), uncond)


# Kernels


class NeedsProbs(Control):
    """Asks for the probabilities and changes nothing: forces the explicit softmax path."""

    def needs_probs(self, call):
        return True


@pytest.mark.parametrize("backbone, dims", [("unet", 2), ("unet", 1), ("dit", 2), ("dit", 1)])
def test_math_path_equals_sdpa_in_the_model(backbone, dims):
    cfg = tiny_config(backbone, dims, "text")
    model = perturbed(cfg, scale=0.2)
    x, t, cond = inputs(cfg)
    fast = model(x, t, cond)
    ctrl = NeedsProbs()
    with control(model, ctrl):
        slow = model(x, t, cond)
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=1e-4)
    assert not any(layer.controls for layer in attention_layers(model).values())
