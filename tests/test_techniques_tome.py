"""Token merging: ratio 0 is the base model, ratio r removes r tokens and the FLOPs they cost, tokens
that equal their destination merge without loss, and the sampling-time control leaves no trace."""

import pytest
import torch
from models_util import inputs, perturbed, tiny_config

from attnlab.attention import Attention, Control, attention_layers, control
from attnlab.diffusion import make_scheduler, sample
from attnlab.errors import ConfigError
from attnlab.evaluate.cost import count_flops
from attnlab.models import build_model
from attnlab.models.techniques.tome import TokenMerging, bipartite_merge, merge_count
from attnlab.techniques import get

pytestmark = pytest.mark.usefixtures("one_thread")


class Lengths(Control):
    """Records how many tokens each self-attention computes with (installed after ToMe)."""

    kind = "self"

    def __init__(self):
        self.seen = {}

    def before(self, call, x):
        self.seen[call.name] = (call.grid, x.shape[1])
        return x


@pytest.mark.parametrize("backbone, dims", [("unet", 2), ("unet", 1), ("dit", 2), ("dit", 1)])
def test_ratio_zero_is_the_base_model_exactly(backbone, dims):
    cfg = tiny_config(backbone, dims, "text")
    x, t, c = inputs(cfg)
    torch.manual_seed(0)
    base = perturbed(cfg)
    merged = build_model(tiny_config(backbone, dims, "text", techniques={"tome": {"ratio": 0.0}}))
    merged.load_state_dict(base.state_dict())
    assert torch.equal(merged(x, t, c), base(x, t, c))
    with control(base, TokenMerging(ratio=0.0)):
        assert torch.equal(base(x, t, c), merged(x, t, c))


@pytest.mark.parametrize(
    "backbone, dims, ratio", [("dit", 2, 0.5), ("dit", 1, 0.3), ("unet", 2, 0.5), ("unet", 1, 0.6)]
)
def test_ratio_removes_the_expected_number_of_tokens(backbone, dims, ratio):
    cfg = tiny_config(backbone, dims, "class", techniques={"tome": {"ratio": ratio}})
    model = build_model(cfg)
    rec = Lengths()
    with control(model, rec):
        model(*inputs(cfg))
    assert set(rec.seen) == {n for n, m in attention_layers(model).items() if m.kind == "self"}
    for grid, n in rec.seen.values():
        full = torch.Size(grid).numel()
        sources = full - torch.Size([g // 2 for g in grid]).numel()  # all but one per whole 2x2 (2) cell
        assert n == full - min(int(ratio * full), sources)
        assert n < full


def test_merging_removes_the_flops_of_the_merged_tokens():
    # One self-attention layer on 64 tokens of width C: projections 2 N C (3C + C), scores and
    # weighted sum 4 N^2 C. Merged: the same on N - r tokens, plus the S x D similarity matmul.
    c, grid, ratio = 16, (8, 8), 0.5
    n, attn = 64, Attention(c, heads=2)
    x = torch.randn(2, n, c)
    r = merge_count(grid, ratio, 2)
    s, d = 48, 16  # sources and destinations of 2x2 cells
    with control(attn, TokenMerging(ratio=ratio)):
        merged = count_flops(lambda: attn(x, grid=grid))
    plain = count_flops(lambda: attn(x, grid=grid))

    def layer(m):
        return 2 * (2 * m * c * 4 * c + 4 * m * m * c)  # batch of 2

    assert r == 32
    assert plain == layer(n)
    assert merged == layer(n - r) + 2 * (2 * s * d * c)


def test_tokens_equal_to_their_destination_merge_without_loss():
    # Every 2x2 cell holds one distinct vector: each source's best match is its own destination,
    # so averaging loses nothing and unmerging restores every token.
    g = torch.Generator().manual_seed(0)
    cells = torch.randn(2, 4, 4, 8, generator=g)  # (B, h/2, w/2, C)
    x = cells.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, 64, 8)  # (B, 64, C)
    merged, unmerge = bipartite_merge(x, (8, 8), r=48)
    assert merged.shape == (2, 16, 8)
    assert torch.equal(unmerge(merged), x)
    _, unmerge_some = bipartite_merge(torch.randn(2, 64, 8, generator=g), (8, 8), r=10)
    assert unmerge_some(torch.zeros(2, 54, 3)).shape == (2, 64, 3)  # any width comes back


def test_tokens_past_the_grid_pass_through():
    x = torch.randn(2, 16 + 3, 4)
    merged, unmerge = bipartite_merge(x, (16,), r=5)
    assert merged.shape == (2, 14, 4) and torch.equal(merged[:, -3:], x[:, 16:])
    assert torch.equal(unmerge(merged)[:, 16:], x[:, 16:])


def test_control_during_sampling_changes_little_and_leaves_no_trace():
    cfg = tiny_config("dit", 2, "class")
    model = perturbed(cfg, scale=0.02).eval()
    _, _, c = inputs(cfg, batch=2)

    def draw():
        return sample(
            model, (2, 2, 16, 16), c, scheduler=make_scheduler("ddim"), steps=3, seeds=[0, 1], guidance=2.0
        )

    base = draw()
    with control(model, get("tome").build(ratio=0.5)) as (tome,):
        merged = draw()
    assert not torch.equal(merged, base)
    assert (merged - base).abs().mean() < 0.1 * base.abs().mean()
    assert all(not layer.controls for layer in attention_layers(model).values())
    assert tome.window.contains(0, 3)
    assert torch.equal(draw(), base)


def test_the_registry_entry_is_training_free_and_a_model_option():
    tech = get("tome")
    assert tech.training_free and tech.level == 1
    assert tech.defaults == {
        "ratio": 0.5,
        "stride": 2,
        "rand": True,
        "max_downsample": 1,
        "layers": "**",
        "start": 0.0,
        "end": 1.0,
    }


@pytest.mark.parametrize(
    "opts, message",
    [({"ratio": 1.0}, "ratio must be in"), ({"stride": 1}, "stride must be an integer >= 2")],
)
def test_bad_options_are_named(opts, message):
    with pytest.raises(ConfigError, match=message):
        build_model(tiny_config("dit", 2, techniques={"tome": opts}))


@pytest.mark.parametrize(
    "cond, other, message",
    [
        ("none", "rope", "rope cannot rotate"),
        ("none", "window_attention", "window_attention needs whole"),
        ("text", "in_context", "in-context text tokens"),
    ],
)
def test_techniques_that_need_every_grid_token_refuse_merging(cond, other, message):
    with pytest.raises(ConfigError, match=message):
        build_model(tiny_config("dit", 2, cond, techniques={"tome": {}, other: {}}))
    model = build_model(tiny_config("dit", 2, cond, techniques={other: {}}))
    with pytest.raises(ConfigError, match=message), control(model, TokenMerging()):
        pass  # the sampling-time control checks the model it is installed on


def test_merging_works_with_tokens_past_the_grid():
    cfg = tiny_config(
        "dit", 2, "class", techniques={"tome": {}, "in_context": {}, "time_embedding": {"mode": "token"}}
    )
    model = build_model(cfg)
    rec = Lengths()
    with control(model, rec):
        out = model(*inputs(cfg))
    assert set(rec.seen.values()) == {((4, 4), 16 - 8 + 2)}  # 8 of 16 merged; time and class tokens kept
    assert out.shape == inputs(cfg)[0].shape
