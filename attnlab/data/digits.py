"""`digits`: scikit-learn's 8x8 handwritten digits (UCI optical digits), upsampled bilinearly.

One channel (the source is grey ink on white paper; here white ink on black, 1 = ink). The 1797
images are split once by a fixed permutation: 80 % train, 20 % eval, the same for every seed, so
no image is ever in both splits.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from attnlab.data.base import Bundle, MemoryDataset

NAMES = [str(d) for d in range(10)]
_SPLIT_SEED = 1797  # fixes the train/eval permutation for every run
_TRAIN_SHARE = 0.8


def split_indices(n: int, split: str) -> np.ndarray:
    """The rows of the source array in `split` (disjoint, covering all n)."""
    order = np.random.default_rng(_SPLIT_SEED).permutation(n)
    cut = int(round(_TRAIN_SHARE * n))
    return np.sort(order[:cut] if split == "train" else order[cut:])


class DigitsDataset(MemoryDataset):
    """Handwritten digits: 'x' (1, size, size), 'label' 0-9, 'text' "a handwritten digit 3"."""

    modality = "image"
    num_classes = 10
    class_names = NAMES

    def build(self) -> Bundle:
        from sklearn.datasets import load_digits

        src = load_digits()
        rows = split_indices(len(src.target), self.split)
        ink = torch.from_numpy(src.images[rows].astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
        big = F.interpolate(ink, size=(self.cfg.size,) * 2, mode="bilinear", align_corners=False)
        labels = torch.from_numpy(src.target[rows].astype(np.int64))
        texts = [f"a handwritten digit {d}" for d in labels.tolist()]
        return Bundle(big.clamp(0, 1) * 2 - 1, texts, labels)
