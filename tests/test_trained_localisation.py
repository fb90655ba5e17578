"""On a model trained on `shapes`, a word's heat map lies on the object the word names.

The model in tests/data/shapes16-text (0.24M parameters, 16 px, one or two objects, trained by the
config beside it) is scored on real eval images, whose masks are exact (DAAM's protocol).
"""

from pathlib import Path

import pytest
import torch

from attnlab.conditioning import get_text_encoder
from attnlab.data import build_dataset
from attnlab.diffusion import scheduler_for
from attnlab.evaluate import shapes_word_targets, word_localisation
from attnlab.train import load_model

MODEL = Path(__file__).parent / "data" / "shapes16-text"


@pytest.fixture(scope="module")
def scores():
    torch.set_num_threads(1)
    model, cfg = load_model(MODEL)
    data = build_dataset(cfg.data, "eval")
    items = [data[i] for i in range(64)]
    return word_localisation(
        model,
        get_text_encoder(),
        torch.stack([it["x"] for it in items]),
        [it["text"] for it in items],
        [shapes_word_targets(it) for it in items],
        scheduler_for(cfg, "ddim"),
        steps=10,
    )


def test_shape_words_cover_their_objects(scores):
    s = scores["shape"]
    assert s["n"] > 64  # every object of every image, some images hold two
    assert s["iou"] > 2 * s["area_iou"], s  # far above a map that says nothing
    assert s["iou"] > 1.5 * s["other_iou"], s  # more on the named object than on the other one


def test_scores_are_ious(scores):
    for s in scores.values():
        assert 0 <= s["iou"] <= 1 and 0 <= s["pointing"] <= 1 and 0 < s["area_iou"] < 1
