"""Level 4 (cross-scale): attention gates on U-Net skips, U-ViT long skips in a DiT, cross-scale
attention in the U-Net decoder."""

import pytest
import torch
from models_util import inputs, perturbed, tiny_config

from attnlab.attention import Control, attention_layers, control, select_layers
from attnlab.errors import ConfigError
from attnlab.models import build_model
from attnlab.models.techniques.attention_gate import AttentionGate
from attnlab.models.techniques.cross_scale_attention import CrossScaleAttention

pytestmark = pytest.mark.usefixtures("one_thread")


def _with_base_weights(cfg, base):
    """The technique's model holding the base model's weights; returns it and the keys it adds."""
    model = build_model(cfg)
    keys = model.load_state_dict(base.state_dict(), strict=False)
    assert not keys.unexpected_keys
    return model, keys.missing_keys


# Attention gates on U-Net skips


@pytest.mark.parametrize("dims", [2, 1])
def test_attention_gate_forced_open_is_the_plain_skip(dims):
    base = perturbed(tiny_config("unet", dims, "class"))
    model, added = _with_base_weights(
        tiny_config("unet", dims, "class", techniques={"attention_gate": {}}), base
    )
    gates = [m for m in model.modules() if isinstance(m, AttentionGate)]
    assert len(gates) == len(model.up) - 1  # every up block, none on the upsampler
    assert added and all(".skip_gate." in k for k in added)
    x, t, cond = inputs(model.config)
    assert not torch.allclose(model(x, t, cond), base(x, t, cond), atol=1e-4)  # a trainable gate
    with torch.no_grad():
        for g in gates:
            g.psi.weight.zero_(), g.psi.bias.fill_(100.0)  # sigmoid(100) == 1 in float32
    torch.testing.assert_close(model(x, t, cond), base(x, t, cond), atol=0, rtol=0)


def test_attention_gate_weighs_each_skip_position_by_its_own_features():
    torch.manual_seed(0)
    gate = AttentionGate(6, 4, inter=3, dims=2)
    skip, g = torch.randn(2, 6, 5, 5), torch.randn(2, 4, 5, 5)
    alpha = gate.coefficients(skip, g)
    assert alpha.shape == (2, 1, 5, 5) and ((alpha > 0) & (alpha < 1)).all()
    torch.testing.assert_close(gate(skip, g), skip * alpha)
    skip2 = skip.clone()
    skip2[:, :, 2, 3] += 3.0
    changed = (gate.coefficients(skip2, g) != alpha)[:, 0]
    assert changed[:, 2, 3].all() and changed.sum() == 2  # only that position's coefficient moves


def test_attention_gate_only_on_selected_levels():
    cfg = tiny_config("unet", 2, techniques={"attention_gate": {"resolutions": [16]}})
    model = build_model(cfg)
    sizes = {blk.res.conv1.out_channels for blk in model.up if getattr(blk, "skip_gate", None) is not None}
    assert sizes == {cfg.width}  # the 16 px level has the base width
    with pytest.raises(ConfigError, match="attention_gate.resolutions=\\[5\\]: 5 is not a feature size"):
        build_model(tiny_config("unet", 2, techniques={"attention_gate": {"resolutions": [5]}}))


# U-ViT long skips


def _set_fuse_(model, keep_current: bool):
    """fuse(cat(h, skip)) = h with [I | 0], = skip with [0 | I]."""
    with torch.no_grad():
        for lin in model.long_skips.fuse:
            d = lin.out_features
            eye, zero = torch.eye(d), torch.zeros(d, d)
            lin.weight.copy_(torch.cat([eye, zero] if keep_current else [zero, eye], dim=1))
            lin.bias.zero_()


@pytest.mark.parametrize("dims", [2, 1])
def test_long_skips_that_pass_the_current_tokens_are_the_plain_dit(dims):
    base = perturbed(tiny_config("dit", dims, "text", depth=4))
    model, added = _with_base_weights(
        tiny_config("dit", dims, "text", depth=4, techniques={"long_skips": {}}), base
    )
    assert len(model.long_skips.fuse) == 2 and all(k.startswith("long_skips.") for k in added)
    x, t, cond = inputs(model.config)
    assert not torch.allclose(model(x, t, cond), base(x, t, cond), atol=1e-4)
    _set_fuse_(model, keep_current=True)
    torch.testing.assert_close(model(x, t, cond), base(x, t, cond), atol=0, rtol=0)


def test_long_skips_join_mirrored_blocks():
    """With depth 5: blocks 0, 1 save; block 2 has no skip; block 3 reads block 1, block 4 block 0."""
    model = perturbed(tiny_config("dit", 2, depth=5, techniques={"long_skips": {}}))
    _set_fuse_(model, keep_current=False)  # an out block then sees exactly the saved tokens
    seen, outs = {}, {}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].clone()))
        blk.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o.clone()))
    model(*inputs(model.config)[:2])
    assert len(model.long_skips.fuse) == 2
    torch.testing.assert_close(seen[2], outs[1])  # the middle block gets its predecessor's output
    torch.testing.assert_close(seen[3], outs[1])
    torch.testing.assert_close(seen[4], outs[0])
    assert not torch.allclose(seen[4], outs[3])


# Cross-scale attention


class Shapes(Control):
    """Records the (queries, keys) of every call, and its grid."""

    def __init__(self):
        self.calls = {}

    def needs_probs(self, call):
        return True

    def probs(self, call, p):
        self.calls[call.name] = (p.shape[-2], p.shape[-1], call.grid)
        return p


@pytest.mark.parametrize(
    "source, dims, expected",
    [  # tiny U-Nets: levels 16 and 8 px (images), 32 and 16 samples (audio)
        ("finer", 2, (8 * 8, 16 * 16, (8, 8))),
        ("coarser", 2, (16 * 16, 8 * 8, (16, 16))),
        ("finer", 1, (16, 32, (16,))),
        ("coarser", 1, (32, 16, (32,))),
    ],
)
def test_decoder_tokens_attend_to_encoder_tokens_of_another_resolution(source, dims, expected):
    cfg = tiny_config("unet", dims, techniques={"cross_scale_attention": {"source": source}})
    model = perturbed(cfg)
    layers = select_layers(model, "**", kind="xscale")
    assert layers and all(m.name.startswith("up.") and m.name.endswith("cross_scale.xscale") for m in layers)
    probe = Shapes()
    with control(model, probe):
        model(*inputs(cfg)[:2])
    assert {v for k, v in probe.calls.items() if k.endswith("xscale")} == {expected}  # (queries, keys, grid)


@pytest.mark.parametrize("source", ["finer", "coarser"])
def test_cross_scale_attention_starts_as_the_plain_decoder(source):
    base = perturbed(tiny_config("unet", 2, "text"))
    techniques = {"cross_scale_attention": {"source": source}}
    model, added = _with_base_weights(tiny_config("unet", 2, "text", techniques=techniques), base)
    assert added and all(".cross_scale." in k for k in added)
    x, t, cond = inputs(model.config)
    torch.testing.assert_close(model(x, t, cond), base(x, t, cond), atol=0, rtol=0)
    for m in model.modules():
        if isinstance(m, CrossScaleAttention):
            torch.nn.init.normal_(m.xscale.to_out.weight, std=0.1)
    assert not torch.allclose(model(x, t, cond), base(x, t, cond), atol=1e-4)


def test_cross_scale_layers_are_not_text_cross_attention():
    model = build_model(tiny_config("unet", 2, "text", techniques={"cross_scale_attention": {}}))
    kinds = {n: m.kind for n, m in attention_layers(model).items()}
    assert {k for n, k in kinds.items() if n.endswith("xscale")} == {"xscale"}
    assert all(not n.endswith("xscale") for n in (m.name for m in select_layers(model, "**", kind="cross")))


def test_cross_scale_errors_name_the_level():
    with pytest.raises(ConfigError, match="level 16 has no finer encoder level"):
        build_model(tiny_config("unet", 2, techniques={"cross_scale_attention": {"resolutions": [16]}}))
    with pytest.raises(ConfigError, match="source='wider' is not allowed"):
        build_model(tiny_config("unet", 2, techniques={"cross_scale_attention": {"source": "wider"}}))
