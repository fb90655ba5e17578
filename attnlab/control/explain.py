"""Heat maps end to end: sample a prompt while recording cross-attention, then one map per word (DAAM)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import Tensor, nn

from attnlab.attention import control
from attnlab.control.edit import text_condition
from attnlab.control.heatmaps import HeatMaps, word_maps
from attnlab.diffusion import sample


def prompt_words(prompt: str) -> list[str]:
    """The distinct words of a prompt, in order."""
    return list(dict.fromkeys(w.lower() for w in re.findall(r"[\w'-]+", prompt)))


def explain(
    model: nn.Module,
    encoder,
    prompt: str,
    words: Sequence[str] | None = None,
    *,
    shape: Sequence[int],
    scheduler,
    steps: int,
    guidance: float,
    seed: int = 0,
    heatmaps: HeatMaps | None = None,
    guidances: Sequence = (),
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sample `prompt` and return the sample with a heat map per word.

    Args:
        model: a text-conditioned denoiser.
        encoder: the text encoder (`encode`, `word_token_indices`).
        prompt: the prompt; words: the words to map (default: every word of the prompt).
        shape: (C, *spatial) of one sample; maps come out at *spatial.
        scheduler, steps, guidance, seed: the sampling loop's settings.
        heatmaps: the recorder (layers, step window); default `HeatMaps()`.
        guidances: further guidance terms.
    Returns:
        (C, *spatial) sample and {word: (*spatial) map, non-negative with maximum 1}.
    """
    hm = heatmaps or HeatMaps()
    device = next(model.parameters()).device
    with control(model, hm):
        x = sample(
            model,
            (1, *shape),
            text_condition(encoder, [prompt], device),
            scheduler=scheduler,
            steps=steps,
            guidance=guidance,
            seeds=[seed],
            guidances=guidances,
        )
    maps = word_maps(hm, prompt, list(words or prompt_words(prompt)), encoder, tuple(shape[1:]))
    return x[0], maps
