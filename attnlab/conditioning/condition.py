"""The condition a denoiser sees: class labels and/or text tokens with a padding mask."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

NULL_LABEL = -1  # a label of -1 is the null (unconditional) class


@dataclass
class Condition:
    """A batch of conditions.

    Attributes:
        labels: (B,) long class ids; NULL_LABEL (-1) means "no class" (classifier-free guidance).
        tokens: (B, L, D) token-level text features (frozen encoder output), or None.
        mask: (B, L) bool, True where a token is real; padding tokens receive no attention.
    The null text condition is a single all-zero token (the model's projection bias makes it a
    learned "empty" token), so unconditional passes need no text encoder.
    """

    labels: Tensor | None = None
    tokens: Tensor | None = None
    mask: Tensor | None = None

    def __len__(self) -> int:
        ref = self.labels if self.labels is not None else self.tokens
        return 0 if ref is None else ref.shape[0]

    def to(self, device) -> Condition:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Condition(move(self.labels), move(self.tokens), move(self.mask))

    def index(self, idx) -> Condition:
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Condition(pick(self.labels), pick(self.tokens), pick(self.mask))

    def null_like(self) -> Condition:
        """The unconditional condition with the same batch size and token shape."""
        labels = None if self.labels is None else torch.full_like(self.labels, NULL_LABEL)
        if self.tokens is None:
            return Condition(labels)
        tokens = torch.zeros_like(self.tokens)
        mask = torch.zeros_like(self.mask)
        mask[:, 0] = True
        return Condition(labels, tokens, mask)

    def where(self, keep: Tensor, other: Condition) -> Condition:
        """Per row: self where `keep` (B,) bool is True, else `other` (condition dropout)."""
        sel = lambda a, b: None if a is None else torch.where(keep.view(-1, *[1] * (a.dim() - 1)), a, b)  # noqa: E731
        return Condition(
            sel(self.labels, other.labels), sel(self.tokens, other.tokens), sel(self.mask, other.mask)
        )

    @staticmethod
    def cat(conds: list[Condition]) -> Condition:
        join = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
        return Condition(
            join([c.labels for c in conds]), join([c.tokens for c in conds]), join([c.mask for c in conds])
        )

    def repeat(self, n: int) -> Condition:
        return Condition.cat([self] * n)

    def replace(self, **kw) -> Condition:
        return replace(self, **kw)
