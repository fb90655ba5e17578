"""In-context conditioning (DiT, Peebles & Xie 2023, arXiv:2212.09748, Sec. 3.2; all inputs as tokens
in U-ViT, Bao et al. 2023, arXiv:2209.12152): the condition's tokens join the patch tokens in one
sequence, every block's self-attention reads them, and they are dropped after the last block.

A class condition is one token (its embedding); a text condition is its pooled vector and its
projected tokens, with the padding mask carried into self-attention. The condition then reaches the
model only this way: no cross-attention, and the adaLN vector carries the timestep alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.techniques import register

# Techniques whose self-attention cannot skip padding tokens (they take no key mask).
NO_KEY_MASK = ("linear_attention", "window_attention", "channel_attention")


@register(
    "in_context",
    level=1,
    paper="DiT in-context conditioning (Peebles & Xie, 2023, arXiv:2212.09748); U-ViT (Bao et al., 2023, arXiv:2209.12152)",
    training_free=False,
    provides=("check", "edit_spec", "condition_tokens"),
    summary=(
        "condition tokens join the patch sequence and are dropped after the blocks: no cross-attention, "
        "no adaLN condition; self-attention pays for (N + L)^2 scores"
    ),
    hosts=("dit",),
    modalities=(1, 2, "tokens", "points"),
)
@dataclass
class InContext:
    """In-context conditioning of a DiT (cond "class" or "text")."""

    def check(self, cfg) -> None:
        if cfg.cond == "none":
            raise ConfigError("model.techniques.in_context needs a condition: model.cond=class or text")
        clash = [n for n in NO_KEY_MASK if n in cfg.techniques]
        if cfg.cond == "text" and clash:
            raise ConfigError(
                f"model.techniques.in_context with text joins padded tokens, which {clash[0]} cannot mask; "
                "drop one of them or use cond=class"
            )

    def edit_spec(self, spec, where):
        """The condition is in the sequence, so the blocks need no cross-attention."""
        return dataclasses.replace(spec, cross_attn=False)

    # Backbone hooks

    def condition_tokens(
        self, vec: Tensor | None, tokens: Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The condition embedder's outputs as tokens: (B, L, dim) and their mask (None: all real).

        Args:
            vec: (B, dim) class embedding or pooled text vector.
            tokens: (B, L, dim) projected text tokens, or None for a class condition.
            mask: (B, L) bool padding mask of the text tokens.
        """
        if tokens is None:
            return vec[:, None], None  # (B, 1, dim): the class token
        joined = torch.cat([vec[:, None], tokens], dim=1)  # (B, 1 + L, dim): pooled, then each token
        return joined, torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)

    def join(self, h: Tensor, cond: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor | None]:
        """(B, N, dim) tokens -> (B, N + L, dim) with the condition after them, and the key mask
        (B, N + L) that hides padding (None when the condition has no padding)."""
        tokens, mask = cond
        joined = torch.cat([h, tokens.to(h.dtype)], dim=1)
        if mask is None:
            return joined, None
        return joined, torch.cat([mask.new_ones(h.shape[0], h.shape[1]), mask], dim=1)
