"""Token merging against its reference, the tomesd package (dbolya/tomesd): its
`bipartite_soft_matching_random2d` is called directly on hand-made tokens, and its documented rules
(the block input as the metric, max_downsample, one destination per 2x2 cell) are written out here.

Tolerances are 1e-5 relative to the output's scale; each test also shows the merge moving its output
by at least 100 times that, so a control that did nothing could not pass.
"""

import math
import zlib

import numpy as np
import pytest
import torch
from models_util import inputs, perturbed, tiny_config
from torch import nn

from attnlab.attention import Attention, Control, control, sample_rows, sample_seeds, sampling_step
from attnlab.diffusion import make_scheduler, sample
from attnlab.models.techniques.tome import TokenMerging, bipartite_merge

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5


def tomesd_merge():
    """tomesd's merge module (the peer package; `pip install -e '.[dev]'` installs it)."""
    return pytest.importorskip(
        "tomesd.merge",
        reason="tomesd, the reference package, is not installed (make setup installs the peers)",
    )


def close(a, b, scale=None):
    scale = b.abs().max() if scale is None else scale
    return (a - b).abs().max() <= TOL * scale


def far(a, b, scale=None):
    scale = b.abs().max() if scale is None else scale
    return (a - b).abs().max() >= 100 * TOL * scale


def seed_of(seed: int, step: int, name: str) -> int:
    """The documented seed of a row's destination draw: SeedSequence([seed, step, crc32(name)])."""
    s = np.random.SeedSequence([seed, step, zlib.crc32(name.encode())]).generate_state(2, dtype=np.uint32)
    return int(s[0]) << 32 | int(s[1])


def tomesd_row(metric, h, w, r, seed=None):
    """tomesd's (merge, unmerge) for one row; `seed` None is its no_rand, else its draw from a generator
    seeded as documented. Also returns its destination positions in its own order."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    m, u = tomesd_merge().bipartite_soft_matching_random2d(
        metric, w, h, 2, 2, r, no_rand=seed is None, generator=gen
    )
    b_idx = [c.cell_contents for n, c in zip(u.__code__.co_freevars, u.__closure__) if n == "b_idx"][0]
    return m, u, b_idx.flatten()


def in_grid_order(merged, n_unmerged, dst_positions):
    """tomesd's merged tokens with its destinations sorted by grid position (its order comes from an
    unstable argsort; attnlab lists them in grid order)."""
    return torch.cat([merged[:, :n_unmerged], merged[:, n_unmerged:][:, dst_positions.argsort()]], dim=1)


def in_tomesd_order(merged, n_unmerged, dst_positions):
    """The inverse of `in_grid_order`."""
    back = dst_positions.argsort().argsort()
    return torch.cat([merged[:, :n_unmerged], merged[:, n_unmerged:][:, back]], dim=1)


class Seen(Control):
    """Records, per call, what a control installed after token merging sees."""

    kind = "self"

    def __init__(self):
        self.calls = []

    def before(self, call, x):
        self.calls.append({"name": call.name, "grid": call.grid, "x": x.clone(), "seeds": call.seeds})
        return x


class Outer(Control):
    """Installed before token merging on one layer: its unmerged input, pre-norm tokens and output."""

    kind = "self"

    def __init__(self, layers):
        self.layers, self.seen = layers, {}

    def before(self, call, x):
        self.seen.update(x=x.clone(), pre_norm=call.pre_norm.clone())
        return x

    def after(self, call, out):
        self.seen["out"] = out.clone()
        return out


class OneLayer(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.attn = Attention(dim, heads=2)

    def forward(self, x, grid):
        return self.attn(x, grid=grid)


def plain_attention(layer: Attention, x):
    """softmax(q k^T / sqrt(d)) v through the layer's weights, written out."""
    b, n, c = x.shape
    q, k, v = (t.view(b, n, layer.heads, -1).transpose(1, 2) for t in layer.to_qkv(x).chunk(3, -1))
    p = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    return layer.to_out((p @ v).transpose(1, 2).reshape(b, n, c))


# The matching and merge on hand-made tokens


@pytest.mark.parametrize("h, w, r", [(8, 8, 32), (6, 10, 20), (5, 7, 30), (8, 8, 100)])
def test_fixed_destinations_merge_and_unmerge_as_tomesd_no_rand(h, w, r):
    # (5, 7): the cells do not cover the last row and column, which are all sources; r = 100 is
    # capped at the sources, as tomesd caps it.
    g = torch.Generator().manual_seed(h * w)
    metric, x = torch.randn(2, h * w, 6, generator=g), torch.randn(2, h * w, 5, generator=g)
    ours, unmerge = bipartite_merge(x, (h, w), r, metric=metric)
    y = torch.randn(*ours.shape[:2], 3, generator=g)  # stands in for what attention returns
    for i in range(2):
        m, u, dst = tomesd_row(metric[i : i + 1], h, w, r)
        theirs = m(x[i : i + 1])
        n_unm = theirs.shape[1] - dst.numel()
        assert ours.shape[1] == theirs.shape[1] == h * w - min(r, h * w - (h // 2) * (w // 2))
        assert close(ours[i : i + 1], in_grid_order(theirs, n_unm, dst))
        assert close(unmerge(y)[i : i + 1], u(in_tomesd_order(y[i : i + 1], n_unm, dst)))
    assert far(unmerge(ours), x)  # the averages moved the merged tokens


def test_random_destinations_are_tomesds_draw_from_each_rows_sample_seed():
    layer, grid, r = OneLayer(), (8, 8), 32
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, 8, generator=g)  # CFG batch: uncond rows of samples 11, 5, then cond rows
    seen = Seen()
    with control(layer, [TokenMerging(ratio=0.5), seen]), sample_seeds(layer, [11, 5]):
        with sampling_step(layer, 3, 10, torch.zeros(4), roles=("uncond", "cond")):
            layer(x, grid)
    (call,) = seen.calls
    assert call["seeds"] == (11, 5, 11, 5)
    choices = []
    for row, seed in enumerate([11, 5, 11, 5]):
        m, _, dst = tomesd_row(x[row : row + 1], 8, 8, r, seed=seed_of(seed, 3, "attn"))
        theirs = m(x[row : row + 1])
        assert close(call["x"][row : row + 1], in_grid_order(theirs, 64 - r - 16, dst))
        choices.append(set(dst.tolist()))
    fixed, _, _ = tomesd_row(x[:1], 8, 8, r)
    assert choices[0] == choices[2] and choices[1] == choices[3] and choices[0] != choices[1]
    assert far(call["x"][:1], fixed(x[:1]))  # the draw changed the merge


def test_a_pass_over_some_samples_uses_their_seeds():
    layer, grid = OneLayer(), (8, 8)
    x = torch.randn(3, 64, 8, generator=torch.Generator().manual_seed(2))
    seen = Seen()
    with control(layer, [TokenMerging(ratio=0.5), seen]), sample_seeds(layer, [7, 8, 9]):
        with sampling_step(layer, 0, 4, torch.zeros(3)):
            layer(x, grid)
            with sample_rows(layer, [2]):
                layer(x[2:], grid)
            with sample_rows(layer, [1, 2]), sample_rows(layer, [1]):  # nested: rows of rows
                layer(x[2:], grid)
            with pytest.raises(ValueError, match="sample_rows"):
                layer(x[1:], grid)  # two rows, three seeds: which samples they are is unknown
    assert seen.calls[1]["seeds"] == seen.calls[2]["seeds"] == (9,)
    assert torch.equal(seen.calls[1]["x"], seen.calls[0]["x"][2:])


def test_half_the_tokens_of_a_layer_merge_and_come_back_as_tomesd_computes_them():
    layer, grid = OneLayer(), (8, 8)
    x = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(3))
    seen = Seen()
    with torch.no_grad():
        with control(layer, [TokenMerging(ratio=0.5, rand=False), seen]):
            out = layer(x, grid)
        m, u, _ = tomesd_row(x, 8, 8, int(64 * 0.5))  # no_rand shares one partition across rows
        want = u(plain_attention(layer.attn, m(x)))
        base = plain_attention(layer.attn, x)
    assert seen.calls[0]["x"].shape == (2, 32, 8)
    assert close(out, want) and far(out, base)


def test_similarity_is_measured_on_the_block_input_before_the_norm():
    cfg = tiny_config("dit", 2, "class")
    model = perturbed(cfg, scale=0.3).eval()
    x, t, c = inputs(cfg, batch=2)
    block_input = {}
    model.blocks[0].register_forward_pre_hook(lambda mod, args: block_input.update(x=args[0].clone()))
    outer = Outer("blocks.0.self")
    with torch.no_grad(), control(model, [outer, TokenMerging(rand=False, layers="blocks.0.self")]):
        model(x, t, c)
        s = outer.seen
        layer, r = model.blocks[0].self, int(16 * 0.5)
        assert torch.equal(s["pre_norm"], block_input["x"])
        m, u, _ = tomesd_row(s["pre_norm"], 4, 4, r)  # compute_merge(x) on the block's input x
        want = u(plain_attention(layer, m(s["x"])))  # ... applied to norm1(x), modulated
        m_in, u_in, _ = tomesd_row(s["x"], 4, 4, r)
        on_input = u_in(plain_attention(layer, m_in(s["x"])))  # attnlab's old metric
        base = plain_attention(layer, s["x"])
    assert close(s["out"], want)
    assert far(s["out"], base) and far(want, on_input)  # merged, and the metric decides the merge


# Which layers merge: max_downsample


def merged_layers(cfg, **opts):
    model = build(cfg)
    seen = Seen()
    with torch.no_grad(), control(model, [TokenMerging(**opts), seen]):
        model(*inputs(cfg, batch=1))
    return {s["name"]: s["grid"] for s in seen.calls if s["x"].shape[1] < math.prod(s["grid"])}, seen


def build(cfg):
    from attnlab.models import build_model

    return build_model(cfg)


@pytest.mark.parametrize("resolutions", [(8, 4), (16, 8)])
def test_max_downsample_counts_from_the_finest_self_attention_grid(resolutions):
    # A U-Net on 16 px data attending at two resolutions. tomesd: downsample = ceil(sqrt(HW / tokens))
    # with HW the latent; here HW is the finest self-attention grid, the same as tomesd's when the
    # model attends at the sample size (16, 8), and the only reading under which the default merges
    # anything when it does not (8, 4).
    cfg = tiny_config("unet", 2, "class", channel_mult=(1, 2, 2), attn_resolutions=resolutions)
    merged, seen = merged_layers(cfg)
    grids = {s["name"]: s["grid"] for s in seen.calls}
    finest = max(math.prod(g) for g in grids.values())
    downsample = {n: math.ceil(math.sqrt(finest // math.prod(g))) for n, g in grids.items()}
    assert {1, 2} <= set(downsample.values())
    assert set(merged) == {n for n, d in downsample.items() if d <= 1}
    assert all(g == (resolutions[0],) * 2 for g in merged.values())
    if resolutions[0] == cfg.size:  # tomesd's own formula, from the sample size
        assert set(merged) == {
            n for n, g in grids.items() if math.ceil(math.sqrt(16 * 16 // math.prod(g))) <= 1
        }
    assert set(merged_layers(cfg, max_downsample=2)[0]) == {n for n, d in downsample.items() if d <= 2}
    assert set(merged_layers(cfg, max_downsample=None)[0]) == set(grids)


def test_every_dit_block_is_at_the_finest_grid():
    cfg = tiny_config("dit", 2, "class", depth=3)
    merged, seen = merged_layers(cfg)
    assert set(merged) == {s["name"] for s in seen.calls} == {f"blocks.{i}.self" for i in range(3)}


# Batch independence and training


def draw(model, cfg, labels, seeds, noise_seeds=None, **opts):
    """Samples in float64, so that batch and lone runs agree far below the tolerance; the noise is
    drawn from `noise_seeds` (default: the seeds) so the seeds' effect on merging can be seen alone."""
    from attnlab.conditioning import Condition

    shape = cfg.sample_shape(1)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in noise_seeds or seeds]
    x_T = torch.cat(noise).double()
    with control(model, TokenMerging(**opts)):
        return sample(
            model,
            x_T.shape,
            Condition(labels=torch.tensor(labels)),
            scheduler=make_scheduler("ddim"),
            steps=3,
            seeds=seeds,
            guidance=3.0,
            x_T=x_T,
        )


def test_each_sample_equals_itself_drawn_alone_with_cfg():
    cfg = tiny_config("dit", 2, "class")
    model = perturbed(cfg, scale=0.05).double().eval()
    labels, seeds = [0, 1, 2], [3, 4, 5]
    batch = draw(model, cfg, labels, seeds)
    alone = torch.cat([draw(model, cfg, [lab], [s]) for lab, s in zip(labels, seeds)])
    scale = batch.abs().max()
    assert close(batch, alone, scale)
    assert far(batch, draw(model, cfg, labels, seeds, rand=False), scale)  # the draws mattered
    assert far(batch, draw(model, cfg, labels, seeds, ratio=0.0), scale)  # and the merge did
    reseeded = draw(model, cfg, labels, [13, 14, 15], noise_seeds=seeds)  # same noise, other draws
    assert all(far(reseeded[i], batch[i], scale) for i in range(3))


def test_training_draws_from_the_global_generator_and_eval_is_fixed():
    cfg = tiny_config("dit", 2, "class", techniques={"tome": {"ratio": 0.5}})
    model = perturbed(cfg, scale=0.3)
    x, t, c = inputs(cfg, batch=2)

    def forward(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(x, t, c)

    model.train()
    a, b, other = forward(0), forward(0), forward(1)
    assert torch.equal(a, b) and far(a, other)  # the trainer seeds torch's generator each step
    model.eval()
    assert torch.equal(forward(0), forward(1))  # outside a sampling run in eval: seed 0, step 0
