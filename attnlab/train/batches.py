"""Training data held in memory: the whole split as one tensor plus its conditions, batched by index.

Text captions are encoded once (each distinct caption a single time), so a training step costs one
gather and no data-loader round trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.conditioning import Condition


@dataclass
class TrainingData:
    """Attributes:
    x: (N, C, *spatial) clean data in [-1, 1].
    labels: (N,) long class ids (cond "class").
    caption_index: (N,) long index into `tokens` (cond "text").
    tokens: (U, L, D) encoded distinct captions, padded to the longest; mask: (U, L) bool.
    """

    x: Tensor
    labels: Tensor | None = None
    caption_index: Tensor | None = None
    tokens: Tensor | None = None
    mask: Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, idx: Tensor) -> tuple[Tensor, Condition | None]:
        """The clean data and conditions of items `idx` (B,)."""
        if self.labels is not None:
            return self.x[idx], Condition(labels=self.labels[idx])
        if self.tokens is not None:
            u = self.caption_index[idx]
            return self.x[idx], Condition(tokens=self.tokens[u], mask=self.mask[u])
        return self.x[idx], None

    def to(self, device) -> TrainingData:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TrainingData(
            *(move(t) for t in (self.x, self.labels, self.caption_index, self.tokens, self.mask))
        )


def prepare_training_data(dataset, cond: str, encoder=None, chunk: int = 256) -> TrainingData:
    """Gather a dataset split into memory with the conditions the model takes.

    Args:
        dataset: an attnlab dataset (`tensors()`, `texts()`, `labels()`).
        cond: "none", "class" or "text".
        encoder: the text encoder (cond "text").
        chunk: captions per encoder call.
    """
    x = dataset.tensors().float()
    if cond == "class":
        return TrainingData(x, labels=dataset.labels().long())
    if cond != "text":
        return TrainingData(x)
    texts = list(dataset.texts())
    distinct = sorted(set(texts))
    where = {t: i for i, t in enumerate(distinct)}
    tokens, mask = _encode_padded(encoder, distinct, chunk)
    return TrainingData(x, caption_index=torch.tensor([where[t] for t in texts]), tokens=tokens, mask=mask)


def _encode_padded(encoder, texts: list[str], chunk: int) -> tuple[Tensor, Tensor]:
    parts = [encoder.encode(texts[i : i + chunk]) for i in range(0, len(texts), chunk)]
    length = max(tok.shape[1] for tok, _ in parts)

    def pad(t: Tensor) -> Tensor:  # (n, L_i[, D]) -> (n, L[, D]) with zeros (masked out)
        extra = length - t.shape[1]
        return torch.nn.functional.pad(t, (0, 0, 0, extra) if t.dim() == 3 else (0, extra))

    tokens = torch.cat([pad(tok.float()) for tok, _ in parts])  # (U, L, D)
    mask = torch.cat([pad(m.bool()) for _, m in parts])  # (U, L)
    return tokens, mask
