"""Training-free control at sampling time: L3 gating and caching, L5 guidance, editing and heat maps.

Controls act on a trained model through the attention bus (`attnlab.attention.control`); guidance
terms plug into the one sampling loop (`attnlab.diffusion.sample(guidances=...)`).
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
