"""Mask conditioning: a fresh model is the base model, the model sees the known data and never the
hidden data, regions are boxes of the asked size, and the condition survives CFG and dropout."""

import pytest
import torch
from models_util import inputs, perturbed, tiny_config

from attnlab.conditioning import Condition
from attnlab.data import DataConfig, build_dataset
from attnlab.errors import ConfigError
from attnlab.models import build_model, training_condition
from attnlab.models.techniques.mask_cond import (
    composite,
    inpaint_input,
    object_region,
    random_regions,
    with_inpaint,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [("unet", 2), ("unet", 1), ("dit", 2), ("dit", 1)]


def _region(cfg, batch=3):
    return random_regions(batch, (cfg.size,) * cfg.dims, torch.Generator().manual_seed(3))


@pytest.mark.parametrize("backbone, dims", CASES)
def test_a_fresh_mask_conditioned_model_is_the_base_model(backbone, dims):
    cfg = tiny_config(backbone, dims, "class")
    base = perturbed(cfg)
    model = build_model(tiny_config(backbone, dims, "class", techniques={"mask_cond": {}}))
    missing = model.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("mask_in.") for k in missing)
    x, t, c = inputs(cfg)
    masked = with_inpaint(c, torch.randn_like(x), _region(cfg))
    assert torch.equal(model(x, t, masked), base(x, t, c))


@pytest.mark.parametrize("backbone, dims", CASES)
def test_the_model_sees_known_data_and_never_hidden_data(backbone, dims):
    cfg = tiny_config(backbone, dims, "none", techniques={"mask_cond": {}})
    model = perturbed(cfg)  # the input layer is no longer zero
    x, t, _ = inputs(cfg)
    x0, region = torch.randn_like(x), _region(cfg)
    ref = model(x, t, with_inpaint(None, x0, region))
    hidden = x0 + 5 * region * torch.randn_like(x0)  # other data inside the region only
    assert torch.equal(model(x, t, with_inpaint(None, hidden, region)), ref)
    known = x0 + 5 * (1 - region) * torch.randn_like(x0)  # other data outside it
    assert not torch.allclose(model(x, t, with_inpaint(None, known, region)), ref)
    nothing_known = Condition(inpaint=inpaint_input(x0, torch.ones_like(region)))
    assert torch.equal(model(x, t, None), model(x, t, nothing_known))  # no input = nothing known


def test_regions_are_boxes_of_the_asked_size():
    g = torch.Generator().manual_seed(0)
    boxes = random_regions(64, (16, 16), g, low=0.25, high=0.5)
    rows, cols = boxes.amax(dim=3)[:, 0].sum(1), boxes.amax(dim=2)[:, 0].sum(1)  # box height, width
    assert rows.min() >= 4 and rows.max() <= 8 and cols.min() >= 4 and cols.max() <= 8
    assert torch.equal(boxes.sum(dim=(1, 2, 3)), rows * cols)  # filled rectangles
    spans = random_regions(8, (100,), g, low=0.5, high=0.5)
    assert spans.shape == (8, 1, 100) and torch.equal(spans.sum(dim=(1, 2)), torch.full((8,), 50.0))


def test_shapes_object_masks_give_object_regions():
    ds = build_dataset(DataConfig(name="shapes", size=16, num=4, num_eval=4, max_objects=2), "eval")
    item = ds[0]
    region = object_region(item["masks"], 0, grow=1)
    assert region.shape == (1, 16, 16)
    assert bool((region[0] >= item["masks"][0].float()).all()) and region.sum() > item["masks"][0].sum()
    x = torch.zeros(1, 3, 16, 16)
    assert torch.equal(composite(torch.ones_like(x), x, region[None]), region[None].expand_as(x))
    with pytest.raises(ConfigError, match="object 5 is not among"):
        object_region(item["masks"], 5)


def test_training_adds_regions_and_cfg_and_dropout_keep_the_field():
    cfg = tiny_config("unet", 2, "class", techniques={"mask_cond": {"low": 0.5, "high": 0.5}})
    x0, _, c = inputs(cfg)
    cond = training_condition(cfg, x0, c, torch.Generator().manual_seed(0))
    assert cond.inpaint.shape == (3, 3, 16, 16) and torch.equal(cond.labels, c.labels)
    assert torch.equal(cond.inpaint[:, -1].sum(dim=(1, 2)), torch.full((3,), 64.0))
    null = cond.null_like()
    assert torch.equal(null.inpaint[:, -1], torch.ones(3, 16, 16)) and not null.inpaint[:, :-1].any()
    both = Condition.cat([null, cond])
    assert len(both) == 6 and torch.equal(both.index(slice(3, 6)).inpaint, cond.inpaint)
    kept = cond.where(torch.tensor([True, False, True]), null)
    assert torch.equal(kept.inpaint[1], null.inpaint[1]) and torch.equal(kept.inpaint[0], cond.inpaint[0])
    assert training_condition(tiny_config("unet", 2, "class"), x0, c, None) is c  # other models: unchanged


def test_an_input_of_the_wrong_shape_is_named():
    cfg = tiny_config("dit", 2, techniques={"mask_cond": {}})
    x, t, _ = inputs(cfg)
    with pytest.raises(ConfigError, match=r"inpaint input of shape \(3, 2, 16, 16\) does not fit"):
        build_model(cfg)(x, t, Condition(inpaint=x))
    with pytest.raises(ConfigError, match="need 0 < low <= high <= 1"):
        build_model(tiny_config("dit", 2, techniques={"mask_cond": {"low": 0.8, "high": 0.2}}))
