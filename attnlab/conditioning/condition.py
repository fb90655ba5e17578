"""The condition a denoiser sees: class labels and/or text tokens with a padding mask, and the known
pixels of an inpainting task (mask conditioning)."""

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
        inpaint: (B, C + 1, *spatial): the known data (zero where unknown) and, as the last channel,
            the region to generate (1) or keep (0); read by models with mask conditioning
            (`attnlab.models.techniques.mask_cond`). Its null: nothing known, all to generate.
    The null text condition is a single all-zero token (the model's projection bias makes it a
    learned "empty" token), so unconditional passes need no text encoder.
    """

    labels: Tensor | None = None
    tokens: Tensor | None = None
    mask: Tensor | None = None
    inpaint: Tensor | None = None

    def __len__(self) -> int:
        ref = next((t for t in (self.labels, self.tokens, self.inpaint) if t is not None), None)
        return 0 if ref is None else ref.shape[0]

    def to(self, device) -> Condition:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Condition(move(self.labels), move(self.tokens), move(self.mask), move(self.inpaint))

    def index(self, idx) -> Condition:
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Condition(pick(self.labels), pick(self.tokens), pick(self.mask), pick(self.inpaint))

    def null_like(self) -> Condition:
        """The unconditional condition with the same batch size and token shape."""
        labels = None if self.labels is None else torch.full_like(self.labels, NULL_LABEL)
        inpaint = None
        if self.inpaint is not None:  # nothing known: zero data, the whole region to generate
            inpaint = torch.cat(
                [torch.zeros_like(self.inpaint[:, :-1]), torch.ones_like(self.inpaint[:, -1:])], 1
            )
        if self.tokens is None:
            return Condition(labels, inpaint=inpaint)
        tokens = torch.zeros_like(self.tokens)
        mask = torch.zeros_like(self.mask)
        mask[:, 0] = True
        return Condition(labels, tokens, mask, inpaint)

    def where(self, keep: Tensor, other: Condition) -> Condition:
        """Per row: self where `keep` (B,) bool is True, else `other` (condition dropout)."""
        sel = lambda a, b: None if a is None else torch.where(keep.view(-1, *[1] * (a.dim() - 1)), a, b)  # noqa: E731
        return Condition(
            sel(self.labels, other.labels),
            sel(self.tokens, other.tokens),
            sel(self.mask, other.mask),
            sel(self.inpaint, other.inpaint),
        )

    @staticmethod
    def cat(conds: list[Condition]) -> Condition:
        join = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
        return Condition(
            join([c.labels for c in conds]),
            join([c.tokens for c in conds]),
            join([c.mask for c in conds]),
            join([c.inpaint for c in conds]),
        )

    def repeat(self, n: int) -> Condition:
        return Condition.cat([self] * n)

    def replace(self, **kw) -> Condition:
        return replace(self, **kw)
