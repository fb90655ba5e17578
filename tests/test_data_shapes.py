"""shapes: deterministic per (seed, index), disjoint splits, masks and captions true to the pixels."""

import numpy as np
import pytest
import torch

from attnlab.data import DataConfig, build_dataset
from attnlab.data.shapes import PALETTE, POSITIONS

ALL_SHAPES = ("circle", "square", "triangle", "diamond", "cross")
ALL_COLORS = tuple(PALETTE)


def shapes(split="train", **kw):
    kw = {"num": 64, "num_eval": 64, **kw}
    return build_dataset(DataConfig(name="shapes", **kw), split)


def test_item_depends_only_on_seed_split_and_index():
    a, b = shapes(num=40), shapes(num=10)
    assert torch.equal(a.tensors()[:10], b.tensors())
    assert a.texts()[:10] == b.texts()
    assert not torch.equal(a.tensors()[:10], shapes(num=10, seed=1).tensors())


def test_train_and_eval_share_no_image():
    kw = {"num": 1500, "num_eval": 500, "size": 16}
    train = {bytes(x.numpy()) for x in shapes("train", **kw).tensors()}
    assert not any(bytes(x.numpy()) in train for x in shapes("eval", **kw).tensors())


@pytest.mark.parametrize("max_objects", [1, 2, 4])
def test_first_radius_lattice_parity_separates_splits(max_objects):
    for split, parity in (("train", 0), ("eval", 1)):
        ds = shapes(split, max_objects=max_objects, size=32)
        for i in range(len(ds)):
            steps = ds[i]["objects"][0]["size"] * 32 * 16  # radius in 1/16-pixel steps
            assert abs(steps - round(steps)) < 1e-6 and round(steps) % 2 == parity


@pytest.mark.parametrize("size,max_objects", [(16, 1), (16, 3), (32, 4), (64, 2)])
def test_masks_cover_exactly_the_object_colour(size, max_objects):
    ds = shapes(size=size, max_objects=max_objects, shapes=ALL_SHAPES, colors=ALL_COLORS, num=24)
    for i in range(len(ds)):
        item = ds[i]
        img = (item["x"].numpy() + 1) / 2  # (3, H, W) in [0, 1]
        masks = item["masks"].numpy()
        assert masks.shape == (len(item["objects"]), size, size) and masks.dtype == bool
        assert masks.sum(0).max() <= 1, "objects overlap"
        for m, obj in zip(masks, item["objects"]):
            assert m.sum() >= 4
            colour = np.array(PALETTE[obj["color"]])[:, None]
            px = img[:, m]  # (3, n_pixels)
            scale = (colour * px).sum(0) / (colour**2).sum()  # coverage of each pixel
            assert scale.min() >= 0.5 - 1e-4 and scale.max() <= 1 + 1e-4
            assert np.abs(px - scale * colour).max() < 1e-4  # the object's colour, nothing mixed in
            ys, xs = np.nonzero(m)
            centre = np.array([xs.mean() + 0.5, ys.mean() + 0.5]) / size
            assert np.abs(centre - [obj["x"], obj["y"]]).max() < 0.6 * obj["size"] + 0.5 / size
        assert img[:, ~masks.any(0)].max() < 0.5  # outside every mask: at most a half-covered edge


def _said(obj):
    return f"a {obj['color']} {obj['shape']}"


@pytest.mark.parametrize("positions", [False, True])
def test_captions_match_attributes(positions):
    ds = shapes(max_objects=4, positions=positions, num=200)
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        objs, text = item["objects"], item["text"]
        words = dict(POSITIONS)
        parts = [
            _said(o) + (f" {words[o['position']]}" if positions and len(objs) != 2 else "") for o in objs
        ]
        if len(objs) == 1:
            assert text == parts[0]
        elif len(objs) == 2:
            rel = "left of" if " left of " in text else "above"
            assert text == f"{parts[0]} {rel} {parts[1]}"
            # The relation holds for the pixels: the first mask ends before the second begins.
            axis = 1 if rel == "left of" else 0
            first, second = (np.nonzero(m.numpy())[axis] for m in item["masks"])
            assert first.max() < second.min()
        else:
            assert text == ", ".join(parts[:-1]) + " and " + parts[-1]
            cells = [(o["y"] > 0.5, o["x"] > 0.5) for o in objs]  # 2x2 layout, named in reading order
            assert cells == sorted(set(cells))
        seen.add(len(objs))
    assert seen == {1, 2, 3, 4}


def test_position_words_say_where_the_object_is():
    ds = shapes(positions=True, size=32, num=200)
    third = {"left": (0, 1 / 3), "right": (2 / 3, 1), "top": (0, 1 / 3), "bottom": (2 / 3, 1)}
    for i in range(len(ds)):
        obj = ds[i]["objects"][0]
        assert obj["position"] in ds[i]["text"]
        for word in obj["position"].split():
            if word in ("left", "right"):
                assert third[word][0] <= obj["x"] <= third[word][1]
            if word in ("top", "bottom"):
                assert third[word][0] <= obj["y"] <= third[word][1]


def test_label_is_shape_times_colours_plus_colour_of_first_object():
    ds = shapes(shapes=("square", "cross"), colors=("white", "red", "cyan"), max_objects=2)
    assert ds.num_classes == 6 and ds.class_names[4] == "red cross"
    for i in range(len(ds)):
        first = ds[i]["objects"][0]
        label = ds[i]["label"]
        assert label == ("square", "cross").index(first["shape"]) * 3 + ("white", "red", "cyan").index(
            first["color"]
        )
        assert ds.class_names[label] == f"{first['color']} {first['shape']}"
    assert torch.equal(ds.labels(), torch.tensor([ds[i]["label"] for i in range(len(ds))]))


def test_colours_differ_within_an_image():
    ds = shapes(max_objects=4, min_objects=2)
    for i in range(len(ds)):
        colours = [o["color"] for o in ds[i]["objects"]]
        assert len(set(colours)) == len(colours)
