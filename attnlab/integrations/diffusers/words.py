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


def text_tokens(pipe, prompt: str) -> list[str]:
    """The tokens of the text `pipe`'s denoiser attends to, one per position, padding included, as
    the pipeline encodes `prompt` (SD3: CLIP's 77, then T5's)."""
    fam = family(pipe)
    clip, t5 = _tokenizers(pipe, fam)
    out: list[str] = []
    for tok, length in ((clip, CLIP_LENGTH), (t5, _t5_length(pipe, fam) if t5 is not None else 0)):
        if tok is None:
            continue
        ids = tok(prompt, padding="max_length", max_length=length, truncation=True).input_ids
        out += tok.convert_ids_to_tokens(ids)
    return out


def real_token_count(pipe, prompt: str) -> int:
    """How many tokens (padding left out) the pipeline's tokenizers make of `prompt`."""
    fam = family(pipe)
    return sum(
        len(tok(prompt, truncation=True).input_ids) for tok in _tokenizers(pipe, fam) if tok is not None
    )


def edit(
    pipe,
    source: str,
    edits: Sequence[str],
    p2p,
    *,
    seed: int,
    steps: int,
    guidance: float,
    controls: Sequence = (),
) -> Tensor:
    """Draw `source` and every prompt of `edits` with the pipeline from the same noise, edited by
    Prompt-to-Prompt through the host (source row first).

    The prompts' tokens are the pipeline's own, padding included (so padding positions map one to
    one, as the reference code's mapper does); word positions come from `word_token_indices`.

    Returns:
        (1 + len(edits), 3, H, W) images in [-1, 1] on the CPU.
    Raises:
        ConfigError: no edit prompt, a local blend on Flux's packed latents, or a p2p setting the
            prompts do not fit (see `PromptToPrompt.bind`).
    """

    from attnlab.attention import control
    from attnlab.integrations.diffusers.load import call_arguments

    prompts = [source, *edits]
    if not edits:
        raise ConfigError("edit: give at least one edited prompt")
    if family(pipe) == "flux" and p2p.blend:
        raise ConfigError(
            "p2p: the local blend reads latent images; Flux packs its latents as tokens (drop --blend)"
        )

    bind_p2p(pipe, prompts, p2p)
    kw = call_arguments(pipe, prompts, [seed] * len(prompts), steps, guidance)  # one noise for every row
    with control(pipe, [p2p, *controls], seeds=[seed] * len(prompts)):
        images = pipe(**kw).images
    return images.float().cpu() * 2 - 1


def bind_p2p(pipe, prompts: Sequence[str], p2p) -> None:
    """Bind Prompt-to-Prompt to the prompts as `pipe` encodes them (row 0 the source)."""

    def find(row: int, word: str) -> list[int]:
        try:
            return word_token_indices(pipe, prompts[row], word)
        except ConfigError:
            return []

    p2p.bind([text_tokens(pipe, p) for p in prompts], find)
