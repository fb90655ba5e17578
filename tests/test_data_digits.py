"""digits: scikit-learn's digits with their true labels, upsampled, split once and for all."""

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from attnlab.data import DataConfig, build_dataset
from attnlab.data.digits import split_indices


def test_splits_partition_the_source():
    train, held = split_indices(1797, "train"), split_indices(1797, "eval")
    assert len(train) == 1438 and len(held) == 359
    assert not set(train) & set(held) and len(set(train) | set(held)) == 1797


def test_items_are_the_source_digits_with_their_labels():
    src = load_digits()
    ds = build_dataset(DataConfig(name="digits", size=16), "eval")
    rows = split_indices(1797, "eval")
    assert ds.num_classes == 10 and ds.tensors().shape == (359, 1, 16, 16)
    assert torch.equal(ds.labels(), torch.from_numpy(src.target[rows]))
    for i in (0, 7, 100):
        item = ds[i]
        assert item["text"] == f"a handwritten digit {item['label']}"
        # Averaging 2x2 blocks of the upsample gives back the 8x8 source, ink bright (positive correlation).
        small = F.avg_pool2d((item["x"][None] + 1) / 2, 2)[0, 0].numpy()
        assert np.corrcoef(small.ravel(), src.images[rows[i]].ravel())[0, 1] > 0.95


def test_size_32_spans_the_value_range():
    x = build_dataset(DataConfig(name="digits", size=32), "train").tensors()
    assert x.shape == (1438, 1, 32, 32) and x.min() == -1 and x.max() == 1
