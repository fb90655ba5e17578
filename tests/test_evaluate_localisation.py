"""Heat-map localisation: a map equal to the mask scores 1, a map elsewhere scores 0."""

import pytest
import torch

from attnlab.data import DataConfig, build_dataset
from attnlab.errors import ConfigError
from attnlab.evaluate.localisation import heatmap_localisation


def test_masks_as_maps_score_perfectly_and_shifted_maps_do_not():
    ds = build_dataset(DataConfig(name="shapes", size=32, num_eval=32, max_objects=2), "eval")
    masks = torch.stack([ds[i]["masks"][0] for i in range(len(ds))])  # first object of each scene
    assert heatmap_localisation(masks.float(), masks) == {"iou": 1.0, "pointing": 1.0, "n": 32}
    # A smooth low-resolution map of the mask still points at the object.
    small = torch.nn.functional.avg_pool2d(masks[:, None].float(), 4)[:, 0]
    result = heatmap_localisation(small, masks)
    assert result["pointing"] == 1.0 and result["iou"] > 0.5
    elsewhere = (~masks).float()
    assert heatmap_localisation(elsewhere, masks)["iou"] == 0.0
    assert heatmap_localisation(elsewhere, masks)["pointing"] == 0.0


def test_shapes_must_match():
    with pytest.raises(ConfigError, match=r"must both be \(N, H, W\)"):
        heatmap_localisation(torch.zeros(2, 4, 4), torch.zeros(3, 8, 8, dtype=torch.bool))
