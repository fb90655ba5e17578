"""A prompt's words as positions in the text a diffusers pipeline's denoiser attends to, for
per-word heat maps (DAAM) on SD, SDXL, PixArt, SD3 and Flux.

The text sequences: SD and SDXL attend to CLIP's tokens (BOS first, 77 long; SDXL's two CLIP
encoders share the positions); PixArt to T5's (no BOS); SD3 to CLIP's 77 positions followed by
T5's; Flux to T5's only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.integrations.diffusers.load import family

CLIP_LENGTH = 77  # SD3 pads CLIP's tokens to the tokenizer's 77 before T5's start


def word_spans(prompt: str, word: str) -> list[tuple[int, int]]:
    """Character spans of every whole-word, case-insensitive occurrence of `word` (or a phrase).

    Raises:
        ConfigError: the word is not in the prompt.
    """
    spans = [m.span() for m in re.finditer(rf"(?<!\w){re.escape(word.strip())}(?!\w)", prompt, re.IGNORECASE)]
    if not word.strip() or not spans:
        raise ConfigError(f"word {word!r} is not in the prompt {prompt!r}")
    return spans


def token_positions(tokenizer, prompt: str, spans, max_length: int | None = None) -> list[int]:
    """Positions of the tokens covering `spans` in the tokenizer's encoding of `prompt` (special
    tokens included, as the pipeline encodes it), within the first `max_length` tokens."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"{type(tokenizer).__name__}: word positions need a fast tokenizer (tokenizer.json)"
        )
    enc = tokenizer(
        prompt, return_offsets_mapping=True, truncation=max_length is not None, max_length=max_length
    )
    return [
        i
        for i, (a, b) in enumerate(enc["offset_mapping"])
        if b > a and any(a < e and s < b for s, e in spans)
    ]


def word_token_indices(pipe, prompt: str, word: str) -> list[int]:
    """Positions of `word`'s tokens (every occurrence) in the text `pipe`'s denoiser attends to.

    Raises:
        ConfigError: the word is not in the prompt (or falls beyond the text the pipeline keeps),
            or the pipeline has no tokenizer for the text its denoiser reads.
    """
    spans = word_spans(prompt, word)
    fam = family(pipe)
    clip, t5 = _tokenizers(pipe, fam)
    found = []
    if clip is not None:
        found += token_positions(clip, prompt, spans, CLIP_LENGTH)
    if t5 is not None:
        offset = CLIP_LENGTH if fam == "sd3" else 0
        found += [offset + i for i in token_positions(t5, prompt, spans, _t5_length(pipe, fam))]
    if not found:
        raise ConfigError(f"word {word!r} lies beyond the text the {fam} pipeline keeps of {prompt!r}")
    return found


def _tokenizers(pipe, fam: str):
    """(CLIP tokenizer, T5 tokenizer) whose tokens the denoiser attends to (either may be None)."""
    pick = {
        "sd": ("tokenizer", None),
        "sdxl": ("tokenizer", None),
        "pixart": (None, "tokenizer"),
        "sd3": ("tokenizer", "tokenizer_3"),
        "flux": (None, "tokenizer_2"),
    }[fam]
    clip, t5 = (getattr(pipe, name, None) if name else None for name in pick)
    if clip is None and t5 is None:
        raise ConfigError(f"the {fam} pipeline has no tokenizer: heat maps need a text-conditioned pipeline")
    return clip, t5


def _t5_length(pipe, fam: str) -> int:
    """The T5 tokens the pipeline keeps: its `max_sequence_length` default."""
    from attnlab.integrations.diffusers.load import call_default

    default = call_default(pipe, "max_sequence_length")
    return int(default) if isinstance(default, int) else 512


def explain(
    pipe,
    prompt: str,
    words: Sequence[str] | None = None,
    *,
    seed: int,
    steps: int,
    guidance: float,
    heatmaps=None,
    controls: Sequence = (),
) -> tuple[Tensor, dict[str, Tensor]]:
    """Draw `prompt` with the pipeline and return the image with a heat map per word (DAAM).

    The maps are aggregated at the finest attention grid the denoiser has (so DAAM's skip of the
    coarsest maps counts from the latent, as DAAM does), then upsampled to the image.

    Args:
        pipe: a diffusers pipeline of a family `family` knows.
        prompt: the prompt; words: the words to map (default: every word of the prompt).
        seed, steps, guidance: the pipeline call's settings.
        heatmaps: the recorder (layers, step window); default `HeatMaps()`.
        controls: further controls and guidance terms installed beside it.
    Returns:
        (3, H, W) image in [-1, 1] and {word: (H, W) map in [0, 1]}.
    """
    from attnlab.control import HeatMaps
    from attnlab.control.common import resize
    from attnlab.control.explain import prompt_words
    from attnlab.integrations.diffusers.load import generate

    hm = heatmaps or HeatMaps()
    words = list(words or prompt_words(prompt))
    indices = {w: word_token_indices(pipe, prompt, w) for w in words}  # bad words fail before sampling
    x = generate(pipe, [prompt], [seed], steps=steps, guidance=guidance, controls=[hm, *controls])[0]
    if not hm.sums:
        hm.maps((1,))  # raises: nothing was recorded
    grid = max((tuple(m.shape[3:]) for m in hm.sums.values()), key=math.prod)
    maps = {}
    for w, idx in indices.items():
        m = hm.word_map(idx, grid)[:1].float()  # (1, *grid)
        maps[w] = resize(m[:, None], tuple(x.shape[1:]))[0, 0].clamp(0, 1)
    return x, maps
