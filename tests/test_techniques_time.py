"""Level 3 (time), architectural part: the timestep added, through adaLN-Zero or as a token, and
time-gated attention. Each test pins down the path the timestep takes through the network."""

import pytest
import torch
from models_util import inputs, perturbed, tiny_config

from attnlab.attention import Control, control
from attnlab.errors import ConfigError
from attnlab.models import build_model
from attnlab.models.blocks import TransformerBlock
from attnlab.models.techniques.time_embedding import AdditiveResBlock

pytestmark = pytest.mark.usefixtures("one_thread")


class SelfOnly(Control):
    """Each token attends to itself alone (an identity attention map), recording the token counts."""

    kind = "self"

    def __init__(self):
        self.tokens, self.grids = set(), set()

    def needs_probs(self, call):
        return True

    def probs(self, call, p):
        self.tokens.add(p.shape[-1])
        self.grids.add(call.grid)
        return torch.eye(p.shape[-1]).expand_as(p)


class ZeroAttention(Control):
    """Every attention layer outputs zeros."""

    def replace(self, call, x):
        return torch.zeros_like(x)


def _other_t(t):
    return (t + 337) % 1000


def _perturb_(module, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# U-Net: added time, adaLN-Zero attention blocks


def test_added_time_is_a_per_channel_bias_after_the_first_convolution():
    """DDPM's residual block: the embedding only shifts the first convolution's output per channel."""
    torch.manual_seed(0)
    block = AdditiveResBlock(4, 6, emb_dim=5, dims=2, groups=2)
    _perturb_(block)
    x, emb = torch.randn(1, 4, 8, 8), torch.randn(1, 5)
    out = block(x, emb)
    with torch.no_grad():
        block.conv1.bias += block.emb(emb)[0]
        block.emb.weight.zero_(), block.emb.bias.zero_()
    torch.testing.assert_close(block(x, torch.randn(1, 5)), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims", [2, 1])
def test_unet_added_time_replaces_scale_shift_everywhere(dims):
    model = build_model(tiny_config("unet", dims, techniques={"time_embedding": {"mode": "add"}}))
    res = [m for m in model.modules() if type(m).__name__.endswith("ResBlock")]
    assert res and all(isinstance(m, AdditiveResBlock) for m in res)


@pytest.mark.parametrize("mode, modulated", [(None, False), ("adaln_zero", True)])
def test_unet_adaln_zero_lets_the_time_modulate_attention_blocks(mode, modulated):
    techniques = {"time_embedding": {"mode": mode}} if mode else {}
    model = perturbed(tiny_config("unet", 2, techniques=techniques))
    block = model.mid.attn
    tokens = torch.randn(2, 64, block.norms[0].normalized_shape[0])
    emb = torch.randn(2, 4 * model.config.width)
    same = torch.allclose(block(tokens, emb, None, (8, 8)), block(tokens, 2 * emb, None, (8, 8)))
    assert same != modulated


# DiT: time added to the tokens, or as one token


@pytest.mark.parametrize("mode", ["add", "token"])
@pytest.mark.parametrize("dims", [2, 1])
def test_dit_time_in_tokens_drops_adaln_and_starts_at_zero(mode, dims):
    cfg = tiny_config("dit", dims, "class", techniques={"time_embedding": {"mode": mode}})
    torch.manual_seed(0)
    model = build_model(cfg)
    assert all(b.ada is None for b in model.blocks) and model.final.ada is None
    x, t, cond = inputs(cfg)
    assert torch.equal(model(x, t, cond), torch.zeros_like(x))


def test_dit_time_token_reaches_the_patches_only_through_attention():
    """U-ViT: the time is one more token; with attention cut to the identity map, no patch can
    read it, so the output no longer depends on the timestep."""
    cfg = tiny_config("dit", 2, techniques={"time_embedding": {"mode": "token"}})
    model = perturbed(cfg)
    x, t, _ = inputs(cfg)
    assert not torch.allclose(model(x, t), model(x, _other_t(t)), atol=1e-4)
    probe = SelfOnly()
    with control(model, probe):
        torch.testing.assert_close(model(x, t), model(x, _other_t(t)), atol=0, rtol=0)
    assert probe.tokens == {16 + 1} and probe.grids == {(4, 4)}  # the grid's tokens and the time token


def test_dit_added_time_enters_once_before_the_blocks():
    cfg = tiny_config("dit", 1, techniques={"time_embedding": {"mode": "add"}})
    model = perturbed(cfg)
    x, t, _ = inputs(cfg)
    assert not torch.allclose(model(x, t), model(x, _other_t(t)), atol=1e-4)
    with torch.no_grad():
        model.time_input.proj.weight.zero_()
    torch.testing.assert_close(model(x, t), model(x, _other_t(t)), atol=0, rtol=0)


@pytest.mark.parametrize("backbone, mode", [("unet", "token"), ("dit", "scale_shift"), ("dit", "film")])
def test_time_embedding_modes_per_backbone(backbone, mode):
    with pytest.raises(ConfigError, match=f"time_embedding.mode='{mode}' is not allowed for the {backbone}"):
        build_model(tiny_config(backbone, 2, techniques={"time_embedding": {"mode": mode}}))


# Time-gated attention


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_time_gates_start_open(backbone):
    """At init every gate is 1: the gated model computes exactly what the ungated one does."""
    base = perturbed(tiny_config(backbone, 2, "text"))
    model = build_model(tiny_config(backbone, 2, "text", techniques={"time_gated_attention": {}}))
    keys = model.load_state_dict(base.state_dict(), strict=False)
    assert not keys.unexpected_keys and keys.missing_keys
    assert all(".time_gate." in k for k in keys.missing_keys)
    x, t, cond = inputs(model.config)
    torch.testing.assert_close(model(x, t, cond), base(x, t, cond), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_closed_time_gate_is_attention_removed(backbone):
    cfg = tiny_config(backbone, 2, "text", techniques={"time_gated_attention": {}})
    model = perturbed(cfg)
    gates = [m.time_gate for m in model.modules() if isinstance(m, TransformerBlock)]
    assert gates and all(g.names == ("self", "cross") for g in gates)
    x, t, cond = inputs(cfg)
    open_out = model(x, t, cond)
    with torch.no_grad():
        for g in gates:
            g.proj.weight.zero_(), g.proj.bias.fill_(-1.0)  # gate = 1 + (-1) = 0 at every timestep
    closed = model(x, t, cond)
    assert not torch.allclose(closed, open_out, atol=1e-4)
    with torch.no_grad():
        for g in gates:
            g.proj.bias.fill_(0.5)
    with control(model, ZeroAttention()):
        torch.testing.assert_close(model(x, t, cond), closed, atol=1e-6, rtol=1e-6)


def test_time_gate_depends_on_the_timestep():
    cfg = tiny_config("dit", 2, techniques={"time_gated_attention": {"blocks": [1]}})
    model = perturbed(cfg)
    assert model.blocks[0].time_gate is None and model.blocks[1].time_gate is not None
    x, t, _ = inputs(cfg)
    c1, c2 = model.embed(t, None, 3)[0], model.embed(_other_t(t), None, 3)[0]
    g1, g2 = model.blocks[1].time_gate(c1)["self"], model.blocks[1].time_gate(c2)["self"]
    assert g1.shape == (3, 1, cfg.width) and not torch.allclose(g1, g2)
