"""Building the condition a denoiser sees from a batch's captions and labels."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnlab.conditioning.condition import Condition
from attnlab.errors import ConfigError

KINDS = ("none", "class", "text")


def make_condition(
    texts: Sequence[str] | None,
    labels: Sequence[int] | torch.Tensor | None,
    kind: str,
    encoder=None,
    max_len: int | None = None,
) -> Condition:
    """The Condition for a batch.

    Args:
        texts: B captions (kind "text").
        labels: B class ids, -1 for the null class (kind "class").
        kind: "none", "class" or "text" (the model's `cond`).
        encoder: a TextEncoder; default: the process-wide one (`get_text_encoder()`).
        max_len: pad text tokens to this length (default: the longest caption in the batch).

    Returns:
        kind "class": Condition(labels=(B,) long); "text": Condition(tokens=(B, L, 384),
        mask=(B, L)); "none": an empty Condition (no labels, no tokens).
    """
    if kind not in KINDS:
        raise ConfigError(f"model.cond={kind!r} is not allowed: expected one of {', '.join(KINDS)}")
    if kind == "none":
        return Condition()
    if kind == "class":
        if labels is None:
            raise ConfigError("a class-conditioned model needs labels (--label)")
        return Condition(labels=torch.as_tensor(labels, dtype=torch.long).reshape(-1))
    if texts is None:
        raise ConfigError("a text-conditioned model needs captions (--prompt)")
    if encoder is None:
        from attnlab.conditioning.text import get_text_encoder

        encoder = get_text_encoder()
    tokens, mask = encoder.encode(list(texts), max_len=max_len)
    return Condition(tokens=tokens, mask=mask)
