"""Training-free control at sampling time: L3 gating and caching, L5 guidance, editing and heat maps.

Controls act on a trained model through the attention bus (`attnlab.attention.control`); guidance
terms plug into the one sampling loop (`attnlab.diffusion.sample(guidances=...)`):

    tgate, maps = TGate(gate=0.4, drop_cfg=True), HeatMaps()
    with control(model, [tgate, maps, AttnCache(every=2, kind="self")]):
        x = sample(model, shape, cond, scheduler=sch, steps=25, guidance=tgate.guidance_schedule(3.0),
                   seeds=seeds, guidances=[PAG(scale=2.0, layers="mid"), SAG(scale=0.5)])
    heat = maps.word_map(encoder.word_token_indices(prompt, "circle"), x.shape[2:])  # (B, H, W)

Editing and explaining end to end: `attnlab.control.edit.edit` (Prompt-to-Prompt) and
`attnlab.control.explain.explain` (a heat map per word); by registry name: `attnlab.control.plan`.
"""

from attnlab.control.cache import AttnCache
from attnlab.control.excite import AttendExcite
from attnlab.control.heatmaps import HeatMaps, normalise, word_maps
from attnlab.control.p2p import PromptToPrompt, align_tokens
from attnlab.control.pag import PAG, identity_attention
from attnlab.control.sag import SAG
from attnlab.control.tgate import TGate

__all__ = [
    "PAG",
    "SAG",
    "AttendExcite",
    "AttnCache",
    "HeatMaps",
    "PromptToPrompt",
    "TGate",
    "align_tokens",
    "identity_attention",
    "normalise",
    "word_maps",
]
