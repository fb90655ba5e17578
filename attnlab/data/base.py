"""The in-memory dataset every attnlab dataset is: one split, built once, served as sample dicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from attnlab.data.config import DataConfig

Split = Literal["train", "eval"]
SPLITS: tuple[str, ...] = ("train", "eval")


@dataclass
class Bundle:
    """A whole split in memory.

    Attributes:
        x: (N, C, H, W) images or (N, 1, T) audio, float32 in [-1, 1].
        texts: N captions.
        labels: (N,) long class ids, or None when the data has no classes.
        extras: per-item ground truth merged into each sample dict (masks, objects, pitches, ...).
    """

    x: Tensor
    texts: list[str]
    labels: Tensor | None = None
    extras: list[dict[str, Any]] = field(default_factory=list)


class MemoryDataset(Dataset):
    """A torch Dataset over one split held in memory; subclasses say how to build the Bundle.

    Attributes:
        modality: "image" or "audio".
        num_classes: number of classes, or None.
        class_names: names indexed by class id, or None.
        sample_rate: samples per second (audio only, else None).
    """

    modality: str = "image"
    num_classes: int | None = None
    class_names: list[str] | None = None
    sample_rate: int | None = None

    def __init__(self, cfg: DataConfig, split: Split):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.cfg = cfg
        self.split = split

    def build(self) -> Bundle:
        raise NotImplementedError

    @cached_property
    def bundle(self) -> Bundle:
        return self.build()

    def __len__(self) -> int:
        return len(self.bundle.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        b = self.bundle
        item: dict[str, Any] = {"x": b.x[i], "text": b.texts[i]}
        if b.labels is not None:
            item["label"] = int(b.labels[i])
        if b.extras:
            item.update(b.extras[i])
        return item

    def tensors(self) -> Tensor:
        """The whole split as one float tensor (N, C, *spatial) in [-1, 1]."""
        return self.bundle.x

    def texts(self) -> list[str]:
        return list(self.bundle.texts)

    def labels(self) -> Tensor | None:
        return self.bundle.labels


def item_rng(seed: int, split: Split, index: int, stream: int) -> np.random.Generator:
    """The random source of one item: a function of (seed, split, index) only, so item i is the
    same whatever else is drawn; `stream` keeps datasets from sharing draws."""
    return np.random.default_rng([stream, seed, SPLITS.index(split), index])


def to_unit_range(x: np.ndarray) -> Tensor:
    """[0, 1] array -> float32 tensor in [-1, 1], in place when `x` is already contiguous float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    x *= 2.0
    x -= 1.0
    return torch.from_numpy(x)
