"""Several controls on one diffusers layer compose as on attnlab models (SD and SD3)."""

from __future__ import annotations

import diffusers_tiny as tiny
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from test_diffusers_host import call_kw, close, images

from attnlab.attention import Control, control
from attnlab.control import PAG, AttnCache, HeatMaps

CASES = {
    # family: (build, size, the layer PAG and the cache share, heat-map layers)
    "sd": (tiny.sd, 64, "mid_block", "**"),
    "sd3": (tiny.sd3, 32, "transformer_blocks.1", "**"),
}


class Passes(Control):
    """Counts the calls of one layer per batch layout (which passes ran it)."""

    def __init__(self, layers):
        self.layers, self.kind, self.seen = layers, None, []

    def active(self, call):
        self.seen.append((call.name, call.roles, call.step))
        return False


@pytest.mark.parametrize("family", list(CASES))
def test_pag_heat_maps_and_cache_on_one_layer(family):
    build, size, shared, _ = CASES[family]
    pipe = build()
    kw = call_kw(pipe, size, steps=4)
    steps = kw["num_inference_steps"]

    def run(with_maps: bool):
        cache = AttnCache(every=2, layers=shared, kind="both", start=0.0)
        maps = HeatMaps() if with_maps else None
        passes = Passes(shared)
        ctrls = [PAG(scale=2.0, layers=shared), cache, passes] + ([maps] if maps else [])
        with control(pipe, ctrls):
            out = images(pipe, kw)
        return out, cache, maps, passes

    plain, cache_alone, _, passes = run(False)
    mapped, cache, maps, _ = run(True)
    close(plain, mapped)  # recording maps changes nothing (the explicit softmax, within float error)
    layers = {name for name, _, _ in passes.seen}
    main = [(n, s) for n, roles, s in passes.seen if roles == ("uncond", "cond")]
    pag = [(n, s) for n, roles, s in passes.seen if roles == ("pag",)]
    assert len(main) == len(pag) == steps * len(layers)  # one main and one perturbed call per step
    # the cache reuses on the main pass only: steps 1 and 3 of 4, every shared layer
    assert cache.hits == cache_alone.hits == 2 * len(layers)
    # heat maps saw the main passes only: one record per mapped layer and step, except where the
    # cache handed back an output (its layers' maps are not computed on the two reuse steps)
    n_maps = len(maps.sums)
    cached = [n for n in maps.sums if n.startswith(shared + ".")]
    assert n_maps > 0 and cached and maps.count == steps * n_maps - 2 * len(cached)
    with control(pipe, [PAG(scale=2.0, layers=shared)]):
        pag_only = images(pipe, kw)
    assert (pag_only - plain).abs().max() > 1e-4  # the cache took effect under PAG


def test_a_users_own_processor_survives_pag_on_its_layer():
    """A processor the user set (an IP-Adapter's, say) keeps running on the main pass of a layer
    PAG perturbs, and is back in place afterwards (diffusers' PAG pipelines overwrote it)."""

    class Halved(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return 0.5 * super().__call__(attn, hidden_states, *args, **kwargs)

    pipe = tiny.sd()
    kw = call_kw(pipe, 64, steps=3)
    name = "mid_block.attentions.0.transformer_blocks.0.attn1"
    module = pipe.unet.get_submodule(name)
    original = module.processor
    mine = Halved()
    module.processor = mine
    try:
        bare_mine = images(pipe, kw)
        with control(pipe, [PAG(scale=0.0, layers="mid_block")]):
            zero = images(pipe, kw)
        with control(pipe, [PAG(scale=2.0, layers="mid_block")]):
            guided = images(pipe, kw)
        assert module.processor is mine
    finally:
        module.processor = original
    bare = images(pipe, kw)
    assert torch.equal(zero, bare_mine) and (bare_mine - bare).abs().max() > 1e-3
    assert (guided - bare_mine).abs().max() > 1e-3


def test_tome_and_pag_share_layers():
    """ToMe merges the tokens of the layers PAG perturbs: the perturbed pass (identity maps,
    to_out(V) per token) runs on the merged tokens too, and ToMe at ratio 0 is PAG alone."""
    from attnlab.models.techniques.tome import TokenMerging as ToMe

    pipe = tiny.sd()
    kw = call_kw(pipe, 64, steps=3)
    with control(pipe, [PAG(scale=2.0, layers="down_blocks.0")]):
        pag = images(pipe, kw)
    with control(pipe, [ToMe(ratio=0.0, layers="down_blocks.0"), PAG(scale=2.0, layers="down_blocks.0")]):
        zero = images(pipe, kw)
    close(pag, zero)
    with control(pipe, [ToMe(ratio=0.5, layers="down_blocks.0"), PAG(scale=2.0, layers="down_blocks.0")]):
        both = images(pipe, kw)
    with control(pipe, [ToMe(ratio=0.5, layers="down_blocks.0")]):
        tome = images(pipe, kw)
    assert (both - pag).abs().max() > 1e-4 and (both - tome).abs().max() > 1e-4
    assert torch.isfinite(both).all()
