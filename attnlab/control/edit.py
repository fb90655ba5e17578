"""Prompt-to-Prompt editing end to end: encode the prompts, sample source and edits in one batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from attnlab.conditioning import Condition
from attnlab.control.p2p import PromptToPrompt
from attnlab.diffusion import sample
from attnlab.errors import ConfigError


def word_finder(encoder, prompts: Sequence[str]) -> Callable[[int, str], list[int]]:
    """(row, word) -> the word's token positions in prompts[row], [] when it is absent."""

    def find(row: int, word: str) -> list[int]:
        try:
            return encoder.word_token_indices(prompts[row], word)
        except ConfigError:
            return []

    return find


def text_condition(encoder, prompts: Sequence[str], device="cpu") -> Condition:
    tokens, mask = encoder.encode(list(prompts))
    return Condition(tokens=tokens.float().to(device), mask=mask.bool().to(device))


def edit(
    model: nn.Module,
    encoder,
    source: str,
    edits: Sequence[str],
    p2p: PromptToPrompt,
    *,
    shape: Sequence[int],
    scheduler,
    steps: int,
    guidance: float,
    seed: int = 0,
    guidances: Sequence = (),
) -> Tensor:
    """Sample `source` and every prompt of `edits` from the same noise, edited by Prompt-to-Prompt.

    Args:
        model: a text-conditioned denoiser.
        encoder: the text encoder (`encode`, `tokens_of`, `word_token_indices`).
        source: the source prompt; edits: the edited prompts.
        p2p: the edit settings; bound to these prompts here.
        shape: (C, *spatial) of one sample.
        scheduler, steps, guidance: the sampling loop's settings.
        seed: the noise seed shared by every row.
        guidances: further guidance terms (PAG, SAG, ...) applied to every row.
    Returns:
        (1 + len(edits), C, *spatial): row 0 the source, then one row per edit.
    """
    prompts = [source, *edits]
    if not edits:
        raise ConfigError("edit: give at least one edited prompt")
    p2p.bind([encoder.tokens_of(p) for p in prompts], word_finder(encoder, prompts))
    device = next(model.parameters()).device
    cond = text_condition(encoder, prompts, device)
    x = sample(
        model,
        (len(prompts), *shape),
        cond,
        scheduler=scheduler,
        steps=steps,
        guidance=guidance,
        seeds=[seed] * len(prompts),
        guidances=[p2p, *guidances],
    )
    return p2p.after_step(x, steps - 1, steps)  # Prompt-to-Prompt blends after every step, the last one too
