"""Heat maps against their reference, castorini/daam, computed here from what that code does.

The raw maps are recorded in this file by a plain control (each call's conditional probabilities,
per layer, head and step) while attnlab's `HeatMaps` records the same run; DAAM's aggregation is
then written here from `daam/trace.py` and `daam/heatmap.py`: per (factor, layer, head) the maps of
the conditional half summed over time (`RawHeatMapCollection.update`), factor 8 left out
(`UNetCrossAttentionHooker.__call__`), each map bicubically upsampled to the latent size and clamped
at zero, the mean over all of them (`compute_global_heat_map`), a word's map the mean over its
tokens (`compute_word_heat_map`) and min-max normalised (`WordHeatMap.expand_as`).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from control_toy import WordTokenizer
from models_util import perturbed, tiny_config

from attnlab.attention import Control, control
from attnlab.conditioning import Condition
from attnlab.control import HeatMaps
from attnlab.diffusion import make_scheduler, sample

ENC = WordTokenizer()
SIDE = 16
PROMPTS = ["a red circle and a blue square", "a green square"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet():
    # 16 px; cross-attention at 8 px (factor 2) and at 2 px (factor 8, the mid block's too)
    cfg = tiny_config(
        "unet",
        2,
        "text",
        in_channels=1,
        context_dim=ENC.dim,
        channel_mult=(1, 1, 1, 1),
        attn_resolutions=(8, 2),
    )
    return perturbed(cfg, seed=2, scale=0.3).eval().double()


class RawMaps(Control):
    """Every cross-attention call of the loop's own passes: (layer, step, cond rows' probabilities)."""

    kind = "cross"

    def __init__(self):
        self.calls = []

    def active(self, call):
        return set(call.roles) <= {"uncond", "cond"}

    def needs_probs(self, call):
        return True

    def probs(self, call, p):
        self.calls.append(
            (call.name, call.step, p[call.chunk(p, "cond")].float())
        )  # DAAM aggregates in float32
        return p


def _run(model, prompts, hm, seeds=(1, 2)):
    c = ENC.condition(prompts)
    cond = Condition(tokens=c.tokens.double(), mask=c.mask)
    noise = [torch.randn(1, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(s)) for s in seeds]
    x_T = torch.cat(noise[: len(prompts)]).double()
    raw = RawMaps()
    with control(model, [hm, raw]):
        sample(model, x_T.shape, cond, scheduler=make_scheduler("ddim"), steps=4, guidance=3.0, x_T=x_T)
    return raw.calls


def daam_global(calls, row, skip=(8,), clamp_each=True):
    """DAAM's global heat map of batch row `row`: (tokens, SIDE, SIDE)."""
    layer_idx = {name: i for i, name in enumerate(dict.fromkeys(name for name, _, _ in calls))}
    heat = {}
    for name, _, p in calls:
        n = p.shape[2]
        factor = int(math.sqrt(SIDE * SIDE // n))  # latent_hw // queries
        if factor in skip:
            continue
        h = w = int(math.sqrt(n))
        for head in range(p.shape[1]):
            key = (factor, layer_idx[name], head)
            heat[key] = heat.get(key, 0) + p[row, head].T.reshape(
                -1, h, w
            )  # (tokens, h, w), summed over time
    ups = [F.interpolate(m.unsqueeze(1), size=(SIDE, SIDE), mode="bicubic") for m in heat.values()]
    if clamp_each:
        return torch.stack([u.clamp(min=0) for u in ups]).mean(0)[:, 0]
    return torch.stack(ups).mean(0)[:, 0].clamp(min=0)


def expand_as(m):
    return (m - m.min()) / (m.max() - m.min() + 1e-8)


def test_maps_are_daam_s_aggregation_of_the_recorded_maps(unet):
    hm = HeatMaps()
    calls = _run(unet, PROMPTS, hm)
    assert {p.shape[2] for _, _, p in calls} == {64, 4}  # 8x8 and 2x2 maps were recorded
    maps = hm.maps((SIDE, SIDE))
    for row in range(2):
        expected = daam_global(calls, row)
        tol = 1e-5 * expected.abs().max()
        torch.testing.assert_close(maps[row], expected, atol=tol, rtol=0)
        # what this test tells apart: the factor-8 maps, and clamping each map before the mean
        assert (daam_global(calls, row, skip=()) - expected).abs().max() > 100 * tol
        assert (daam_global(calls, row, clamp_each=False) - expected).abs().max() > 100 * tol


def test_word_map_is_the_mean_of_its_tokens_min_max_normalised(unet):
    hm = HeatMaps()
    calls = _run(unet, PROMPTS, hm)
    expected = daam_global(calls, 0)
    a = ENC.word_token_indices(PROMPTS[0], "a")
    assert len(a) == 2  # both occurrences, as compute_token_merge_indices finds them
    pieces = ENC.word_token_indices(PROMPTS[0], "red") + ENC.word_token_indices(PROMPTS[0], "circle")
    for idx in (a, ENC.word_token_indices(PROMPTS[0], "square"), pieces):  # pieces: a word of two tokens
        want = expand_as(expected[idx].mean(0))
        torch.testing.assert_close(hm.word_map(idx, (SIDE, SIDE))[0], want, atol=1e-5, rtol=0)
    assert (expand_as(expected[pieces[:1]].mean(0)) - expand_as(expected[pieces].mean(0))).abs().max() > 1e-3


def test_only_coarse_maps_are_kept_rather_than_none(unet):
    hm = HeatMaps(layers="mid")  # the mid block alone: 2x2 maps, factor 8
    calls = [c for c in _run(unet, PROMPTS, hm) if c[0].startswith("mid.")]
    expected = daam_global(calls, 0, skip=())
    torch.testing.assert_close(hm.maps((SIDE, SIDE))[0], expected, atol=1e-5 * expected.abs().max(), rtol=0)


def test_each_sample_s_maps_equal_its_maps_drawn_alone(unet):
    both = HeatMaps()
    _run(unet, PROMPTS, both)
    together = both.maps((SIDE, SIDE))
    tol = 1e-5 * together.abs().max()
    for row, prompt in enumerate(PROMPTS):
        alone = HeatMaps()
        _run(unet, [prompt], alone, seeds=((1, 2)[row],))
        keys = alone.maps((SIDE, SIDE)).shape[1]
        torch.testing.assert_close(together[row, :keys], alone.maps((SIDE, SIDE))[0], atol=tol, rtol=0)
    assert (together[0, 1] - together[1, 1]).abs().max() > 100 * tol
