"""The task protocol and the losses shared by every evaluator head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.evaluate.network import EvaluatorConfig

IGNORE = -100  # target of pixels/frames a class head is not trained on (background, silence)


class Task:
    """What an evaluator predicts for one kind of data.

    Attributes:
        kind: the registry key, stored in the evaluator's JSON config.
        vocab: attribute name -> list of values (class names, shapes, colours, notes...).
    """

    kind = ""

    def __init__(self, vocab: dict[str, list[str]], **options):
        self.vocab = {k: list(v) for k, v in vocab.items()}
        self.options = options

    def network(self, dims: int, in_channels: int) -> EvaluatorConfig:
        """The network shape this task needs (heads sized by the vocabulary)."""
        raise NotImplementedError

    def targets(self, items: list[dict], grid: tuple[int, ...], stride: int = 1) -> dict[str, Tensor]:
        """Training targets of a list of dataset items; dense targets on the network's output grid,
        whose cells are `stride` input pixels/samples apart."""
        raise NotImplementedError

    def transform(self, x: Tensor, targets: dict[str, Tensor], gen: torch.Generator):
        """Label-changing transforms of a training batch (the pretext task); most tasks keep it."""
        return x, targets

    def decode(self, out: dict[str, Tensor], **context) -> list[dict]:
        """Network outputs of a batch -> one prediction dict per sample."""
        raise NotImplementedError


def head_loss(kind: str, logits: Tensor, target: Tensor) -> Tensor:
    """Loss of one head: "class" (softmax CE, IGNORE skipped), "multi"/"binary" (sigmoid BCE)."""
    if kind == "class":
        if not (target != IGNORE).any():
            return logits.sum() * 0.0  # nothing to learn here in this batch (all background)
        return F.cross_entropy(logits, target, ignore_index=IGNORE)
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


def total_loss(cfg: EvaluatorConfig, out: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
    heads = {**cfg.global_heads, **cfg.dense_heads}
    return sum(head_loss(heads[name][0], out[name], t) for name, t in targets.items())


def runs(active: Tensor) -> list[tuple[int, int]]:
    """[start, stop) index ranges of consecutive True values in a 1D bool tensor."""
    padded = torch.cat([active.new_zeros(1), active, active.new_zeros(1)]).int()
    edges = torch.diff(padded)
    starts, stops = torch.nonzero(edges == 1).flatten(), torch.nonzero(edges == -1).flatten()
    return list(zip(starts.tolist(), stops.tolist()))
