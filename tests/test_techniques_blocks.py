"""Level 2 (inside the blocks): where self-attention sits, cross-attention per block, the linear and
windowed kernels, channel attention. Each test checks the mechanism, not only that a model runs."""

import math

import pytest
import torch
import torch.nn.functional as F
from models_util import CTX, inputs, perturbed, tiny_config

from attnlab.attention import Attention, Control, attention_layers, control
from attnlab.errors import ConfigError
from attnlab.evaluate.cost import count_flops
from attnlab.models import build_model
from attnlab.models.blocks import TransformerBlock
from attnlab.models.specs import AttnSpec
from attnlab.models.techniques.channel_attention import ChannelAttention
from attnlab.models.techniques.linear_attention import LinearKernel
from attnlab.models.techniques.window_attention import WindowKernel

pytestmark = pytest.mark.usefixtures("one_thread")


def _qkv(n: int, d: int = 8, heads: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, heads, n, d, generator=g) for _ in range(3))


class NeedsProbs(Control):
    """Forces the explicit path (the kernel's `probs`) without changing anything."""

    def needs_probs(self, call):
        return True


def _explicit_equals_fast(model, x, t, cond):
    ref = model(x, t, cond)
    with control(model, NeedsProbs()):
        torch.testing.assert_close(model(x, t, cond), ref, atol=1e-5, rtol=1e-4)


# Where self-attention sits


def _patch_influence(model, cfg, x, t):
    """Which output patches change when only the first patch of the input changes."""
    y = x.clone()
    y[..., : cfg.patch, : cfg.patch] += 1.0
    diff = (model(y, t) - model(x, t)).abs()
    p = cfg.patch
    return diff.unfold(2, p, p).unfold(3, p, p).sum(dim=(0, 1, 4, 5)) > 0  # (h, w) changed patches


def test_dit_without_self_attention_treats_each_patch_alone():
    cfg = tiny_config("dit", 2, techniques={"attn_placement": {"blocks": []}})
    x, t, _ = inputs(cfg)
    changed = _patch_influence(perturbed(cfg), cfg, x, t)
    assert changed[0, 0] and changed.sum() == 1  # only the patch itself
    base = tiny_config("dit", 2)
    assert _patch_influence(perturbed(base), base, x, t).all()  # attention spreads it everywhere


def test_placement_keeps_self_attention_where_listed():
    dit = build_model(tiny_config("dit", 1, "text", depth=3, techniques={"attn_placement": {"blocks": [1]}}))
    assert [n for n, m in attention_layers(dit).items() if m.kind == "self"] == ["blocks.1.self"]
    assert len([m for m in attention_layers(dit).values() if m.kind == "cross"]) == 3  # cross stays
    unet = build_model(tiny_config("unet", 2, techniques={"attn_placement": {"up": False}}))
    names = list(attention_layers(unet))
    assert names and not any(n.startswith("up.") for n in names)
    assert any(n.startswith("down.") for n in names) and "mid.attn.self" in names


@pytest.mark.parametrize(
    "backbone, options, message",
    [
        ("dit", {"blocks": [2]}, r"attn_placement.blocks=\[2\]: 2 is not a block index 0..1"),
        ("unet", {"blocks": [0]}, "attn_placement.blocks is a DiT option"),
        ("dit", {"up": False}, "down/mid/up are U-Net options"),
        ("unet", {"down": "no"}, "attn_placement.down='no' is not allowed"),
    ],
)
def test_placement_errors_name_the_option(backbone, options, message):
    with pytest.raises(ConfigError, match=message):
        build_model(tiny_config(backbone, 2, techniques={"attn_placement": options}))


# Cross-attention on or off


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_without_cross_attention_text_enters_only_pooled(backbone):
    """Without cross-attention the caption reaches the model as the mean of its tokens: tokens moved
    apart without moving their mean change nothing; with cross-attention they do."""
    cfg = tiny_config(backbone, 2, "text", techniques={"cross_attention": {"enabled": False}})
    model = perturbed(cfg)
    assert not [m for m in attention_layers(model).values() if m.kind == "cross"]
    x, t, cond = inputs(cfg)
    cond = cond.replace(mask=torch.ones_like(cond.mask))
    spread = cond.tokens.clone()
    spread[:, 0] += 2.0
    spread[:, 1] -= 2.0  # same mean
    moved = cond.replace(tokens=spread)
    torch.testing.assert_close(model(x, t, moved), model(x, t, cond), atol=1e-5, rtol=1e-5)
    base = perturbed(tiny_config(backbone, 2, "text"))
    assert not torch.allclose(base(x, t, moved), base(x, t, cond), atol=1e-4)


def test_cross_attention_kept_in_selected_blocks_only():
    cfg = tiny_config("dit", 2, "text", depth=3, techniques={"cross_attention": {"blocks": [0, 2]}})
    crosses = [n for n, m in attention_layers(build_model(cfg)).items() if m.kind == "cross"]
    assert crosses == ["blocks.0.cross", "blocks.2.cross"]


def test_cross_attention_needs_text():
    with pytest.raises(ConfigError, match="cross_attention needs model.cond=text"):
        build_model(tiny_config("unet", 2, "class", techniques={"cross_attention": {}}))


# Linear attention


@pytest.mark.parametrize("feature", ["elu", "relu"])
def test_linear_kernel_is_normalised_kernel_attention(feature):
    """Katharopoulos et al. eq. 4: V'_i = sum_j sim(q_i, k_j) v_j / sum_j sim(q_i, k_j), with
    sim(q, k) = phi(q) . phi(k); the kernel computes it through the d x d summary instead."""
    q, k, v = _qkv(20)
    phi = (lambda z: F.elu(z) + 1) if feature == "elu" else F.relu
    sim = torch.einsum("bhnd,bhmd->bhnm", phi(q), phi(k))
    ref = torch.einsum("bhnm,bhmd->bhnd", sim, v) / (sim.sum(-1, keepdim=True) + 1e-6)
    kernel = LinearKernel(feature)
    torch.testing.assert_close(kernel.attend(q, k, v, (20,)), ref, atol=1e-5, rtol=1e-4)
    p = kernel.probs(q, k, (20,))
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5, rtol=0)


def test_linear_attention_cost_grows_linearly_with_tokens():
    kernel = LinearKernel()
    lin = [count_flops(lambda n=n: kernel.attend(*_qkv(n, d=16), (n,))) for n in (64, 256)]
    soft = [count_flops(lambda n=n: F.scaled_dot_product_attention(*_qkv(n, d=16))) for n in (64, 256)]
    assert lin[1] == 4 * lin[0]  # O(N d^2)
    assert soft[1] == 16 * soft[0]  # O(N^2 d)
    assert lin[1] < soft[1]


@pytest.mark.parametrize("backbone", ["unet", "dit"])
@pytest.mark.parametrize("dims", [2, 1])
def test_linear_attention_in_models_matches_its_explicit_map(backbone, dims):
    cfg = tiny_config(backbone, dims, "text", techniques={"linear_attention": {}})
    model = perturbed(cfg)
    kinds = {type(m.kernel) for m in attention_layers(model).values() if m.kind == "self"}
    assert kinds == {LinearKernel}
    _explicit_equals_fast(model, *inputs(cfg))


def test_one_kernel_per_model():
    techniques = {"linear_attention": {}, "window_attention": {}}
    with pytest.raises(ConfigError, match="choose one"):
        build_model(tiny_config("dit", 2, techniques=techniques))


# Windowed attention


def _swin_reference(q, k, v, grid, window, shift):
    """Shifted-window attention written the Swin way: roll the map, cut windows, mask the pairs that
    were not neighbours before the roll (three slices per axis), attend, paste back, roll back."""
    b, h, n, d = q.shape
    hh, ww = grid

    def windows(t):
        t = t.view(b, h, hh, ww, d).roll((-shift, -shift), dims=(2, 3))
        t = t.view(b, h, hh // window, window, ww // window, window, d).transpose(3, 4)
        return t.reshape(b, h, -1, window * window, d)  # (B, heads, W, L, d)

    region = torch.zeros(hh, ww, dtype=torch.long)
    if shift:
        cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        for i, rs in enumerate(cuts):
            for j, cs in enumerate(cuts):
                region[rs, cs] = 3 * i + j
    r = region.view(hh // window, window, ww // window, window).transpose(1, 2).reshape(-1, window * window)
    mask = r[:, :, None] == r[:, None, :]  # (W, L, L)
    out = F.scaled_dot_product_attention(windows(q), windows(k), windows(v), attn_mask=mask)
    out = out.view(b, h, hh // window, ww // window, window, window, d).transpose(3, 4)
    return out.reshape(b, h, hh, ww, d).roll((shift, shift), dims=(2, 3)).reshape(b, h, n, d)


@pytest.mark.parametrize("shift", [0, 2])
def test_window_kernel_matches_swin(shift):
    q, k, v = _qkv(64)
    kernel = WindowKernel(4, shift)
    ref = _swin_reference(q, k, v, (8, 8), 4, shift)
    torch.testing.assert_close(kernel.attend(q, k, v, (8, 8)), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kernel.probs(q, k, (8, 8)) @ v, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("grid, query, outside", [((8, 8), 0, 4), ((8, 8), 9, 36), ((16,), 5, 8)])
def test_window_tokens_see_only_their_window(grid, query, outside):
    q, k, v = _qkv(math.prod(grid))
    kernel = WindowKernel(4)
    out = kernel.attend(q, k, v, grid)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, outside] += 5.0
    v2[:, :, outside] += 5.0
    out2 = kernel.attend(q, k2, v2, grid)
    torch.testing.assert_close(out2[:, :, query], out[:, :, query], atol=0, rtol=0)
    assert not torch.allclose(out2[:, :, outside], out[:, :, outside])
    assert (kernel.probs(q, k, grid)[:, :, query, outside] == 0).all()


@pytest.mark.parametrize("backbone", ["unet", "dit"])
@pytest.mark.parametrize("dims", [2, 1])
def test_window_covering_everything_is_global_attention(backbone, dims):
    base_cfg = tiny_config(backbone, dims, "text")
    cfg = tiny_config(backbone, dims, "text", techniques={"window_attention": {"window": 64}})
    base, model = perturbed(base_cfg), build_model(cfg)
    model.load_state_dict(base.state_dict())
    x, t, cond = inputs(cfg)
    torch.testing.assert_close(model(x, t, cond), base(x, t, cond), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_small_windows_change_the_model_and_keep_the_explicit_map(backbone):
    base_cfg = tiny_config(backbone, 2, "text")
    cfg = tiny_config(backbone, 2, "text", techniques={"window_attention": {"window": 2}})
    base, model = perturbed(base_cfg), build_model(cfg)
    model.load_state_dict(base.state_dict())
    x, t, cond = inputs(cfg)
    assert not torch.allclose(model(x, t, cond), base(x, t, cond), atol=1e-4)
    _explicit_equals_fast(model, x, t, cond)


def test_dit_windows_shift_every_other_block():
    cfg = tiny_config("dit", 2, depth=4, techniques={"window_attention": {"window": 2}})
    shifts = [m.kernel.shift for m in attention_layers(build_model(cfg)).values()]
    assert shifts == [0, 1, 0, 1]


def test_window_attention_flops_scale_with_window_area():
    q, k, v = _qkv(256, d=16)
    full = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    for window in (2, 4, 8):
        local = count_flops(lambda w=window: WindowKernel(w).attend(q, k, v, (16, 16)))
        assert local * 256 == full * window**2  # N w^2 instead of N^2 score entries


def test_window_errors_name_the_problem():
    with pytest.raises(ConfigError, match="window 3 does not tile a grid side of 8"):
        build_model(tiny_config("unet", 2, techniques={"window_attention": {"window": 3}}))
    with pytest.raises(ConfigError, match="window_attention.window=0 is not allowed"):
        build_model(tiny_config("unet", 2, techniques={"window_attention": {"window": 0}}))
    with pytest.raises(ConfigError, match="exactly the grid's tokens"):
        WindowKernel(4).attend(*_qkv(65), (8, 8))


# Channel attention (XCA)


def test_channel_attention_mixes_channels_not_tokens():
    torch.manual_seed(0)
    layer = ChannelAttention(12, heads=3)
    x = torch.randn(2, 10, 12)
    a, v = layer.channel_map(x)
    assert a.shape == (2, 3, 4, 4)  # d x d per head, whatever the number of tokens
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 4))
    perm = torch.randperm(10)
    torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm], atol=1e-6, rtol=1e-5)
    # every output channel of a token is a mix of that same token's value channels
    mixed = torch.einsum("bhij,bhjn->bhin", a, v)  # (B, heads, d, N)
    ref = layer.to_out(mixed.permute(0, 3, 1, 2).reshape(2, 10, 12))
    torch.testing.assert_close(layer(x), ref, atol=1e-6, rtol=1e-5)


def test_channel_attention_cost_grows_linearly_with_tokens():
    layer = ChannelAttention(16, heads=2)
    flops = [count_flops(lambda n=n: layer(torch.randn(1, n, 16))) for n in (32, 128)]
    assert flops[1] == 4 * flops[0]


@pytest.mark.parametrize("modulation", ["none", "adaln_zero"])
def test_channel_attention_sublayer_follows_self_attention_and_starts_at_zero(modulation):
    spec = AttnSpec(
        heads=2, cross_attn=True, mlp_ratio=2.0, modulation=modulation, channel_attn=ChannelAttention
    )
    block = TransformerBlock(16, spec, emb_dim=8, context_dim=CTX)
    assert block.subs == ("self", "chan", "cross", "mlp")
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 6, 16, generator=g), torch.randn(2, 8, generator=g)
    ctx = (torch.randn(2, 3, CTX, generator=g), torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(block(x, emb, ctx, (6,)), x)  # a new sub-layer starts as the identity
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    ref = block(x, emb, ctx, (6,))
    with torch.no_grad():
        block.chan.to_out.weight.zero_(), block.chan.to_out.bias.zero_()
    assert not torch.allclose(block(x, emb, ctx, (6,)), ref)  # and then it contributes


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_channel_attention_in_every_transformer_block_off_the_bus(backbone):
    model = build_model(tiny_config(backbone, 1, "text", techniques={"channel_attention": {}}))
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    assert blocks and all(b.subs[:3] == ("self", "chan", "cross") for b in blocks)
    assert not any(isinstance(b.chan, Attention) for b in blocks)  # its map is over channels


def test_linear_attention_ignores_padding_keys():
    """In-context text joins the self-attention sequence with a padding mask; a linear-attention
    layer must give padding keys no weight, on its fast and its explicit path, as softmax does."""
    torch.manual_seed(0)
    layer = Attention(12, heads=3, kernel=LinearKernel())
    x = torch.randn(2, 10, 12)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False
    out = layer(x, context_mask=mask)
    garbage = x.clone()
    garbage[0, 7:] = 1e3
    torch.testing.assert_close(layer(garbage, context_mask=mask)[0, :7], out[0, :7])
    explicit, p = layer.forward_math(garbage, context_mask=mask)
    torch.testing.assert_close(explicit[0, :7], out[0, :7], atol=1e-5, rtol=1e-4)
    assert (p[0, :, :, 7:] == 0).all()


def test_window_attention_refuses_extra_tokens():
    techniques = {"window_attention": {}, "in_context": {}}
    with pytest.raises(ConfigError, match="window_attention cannot be combined with in_context"):
        build_model(tiny_config("dit", 2, "class", techniques=techniques))
    techniques = {"window_attention": {}, "time_embedding": {"mode": "token"}}
    with pytest.raises(ConfigError, match="cannot be combined with time_embedding mode=token"):
        build_model(tiny_config("dit", 2, techniques=techniques))
