"""Class tasks: one label per sample (digits, labelled folders), or, without labels, a pretext.

The pretext task (unlabelled folders) learns features by predicting which transform a sample got:
a quarter-turn rotation for images (Gidaris et al., 2018) or time reversal for audio. Its features
feed FID/KID; it has no label to check alignment against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.evaluate.network import EvaluatorConfig
from attnlab.evaluate.tasks.base import Task


def _network(dims: int, in_channels: int, heads: dict) -> EvaluatorConfig:
    if dims == 1:
        return EvaluatorConfig(dims=1, in_channels=1, mult=(1, 2, 3, 4, 4), global_heads=heads)
    return EvaluatorConfig(dims=2, in_channels=in_channels, global_heads=heads)


class ClassesTask(Task):
    kind = "classes"

    def network(self, dims: int, in_channels: int) -> EvaluatorConfig:
        return _network(dims, in_channels, {"label": ("class", len(self.vocab["label"]))})

    def targets(self, items: list[dict], grid: tuple[int, ...], stride: int = 1) -> dict[str, Tensor]:
        return {"label": torch.tensor([int(it["label"]) for it in items])}

    @torch.no_grad()
    def decode(self, out: dict[str, Tensor], **context) -> list[dict]:
        probs = out["label"].softmax(1)
        conf, label = probs.max(1)
        return [{"label": int(k), "confidence": float(c)} for k, c in zip(label, conf)]


class PretextTask(Task):
    kind = "pretext"

    def __init__(self, vocab: dict[str, list[str]] | None = None, **options):
        super().__init__(vocab or {"transform": []}, **options)

    def network(self, dims: int, in_channels: int) -> EvaluatorConfig:
        self.vocab["transform"] = ["none", "rot90", "rot180", "rot270"] if dims == 2 else ["none", "reversed"]
        return _network(dims, in_channels, {"transform": ("class", len(self.vocab["transform"]))})

    def targets(self, items: list[dict], grid: tuple[int, ...], stride: int = 1) -> dict[str, Tensor]:
        return {"transform": torch.zeros(len(items), dtype=torch.long)}

    def transform(self, x: Tensor, targets: dict[str, Tensor], gen: torch.Generator):
        k = torch.randint(len(self.vocab["transform"]), (len(x),), generator=gen)
        if x.dim() == 4:
            x = torch.stack([torch.rot90(xi, int(ki), dims=(1, 2)) for xi, ki in zip(x, k)])
        else:
            x = torch.where(k.view(-1, 1, 1) == 1, x.flip(-1), x)
        return x, {"transform": k}

    @torch.no_grad()
    def decode(self, out: dict[str, Tensor], **context) -> list[dict]:
        return [{} for _ in range(len(out["features"]))]
