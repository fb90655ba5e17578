"""Alignment scoring and caption parsing: ground truth scores as correct, mistakes are counted."""

import numpy as np
import pytest

from attnlab.data import DataConfig, build_dataset
from attnlab.data.config import COLORS, SHAPES
from attnlab.errors import ConfigError
from attnlab.evaluate import cents, fft_pitch, parse_request, request_from_item
from attnlab.evaluate.alignment import _summarise_shapes, score_shapes
from attnlab.evaluate.pitch import split_notes


def _shapes(size=16, max_objects=3, positions=True, n=120):
    cfg = DataConfig(
        name="shapes",
        size=size,
        num_eval=n,
        max_objects=max_objects,
        positions=positions,
        shapes=SHAPES,
        colors=COLORS,
    )
    return build_dataset(cfg, "eval")


@pytest.mark.parametrize("positions", [True, False])
def test_captions_parse_to_the_ground_truth(positions):
    ds = _shapes(max_objects=4, positions=positions)
    for i in range(len(ds)):
        item = ds[i]
        assert parse_request("shapes", item["text"]) == request_from_item("shapes", item), item["text"]


def test_ground_truth_objects_score_as_correct():
    ds = _shapes(max_objects=4)
    scores = []
    for i in range(len(ds)):
        item = ds[i]
        found = {
            "objects": list(reversed(item["objects"])),
            "count": len(item["objects"]),
        }  # order must not matter
        scores.append(score_shapes(request_from_item("shapes", item), found))
    summary = _summarise_shapes(scores)
    assert summary == {
        "shape_acc": 1.0,
        "color_acc": 1.0,
        "position_acc": 1.0,
        "count_acc": 1.0,
        "relation_acc": 1.0,
        "all_correct": 1.0,
    }


def test_mistakes_are_counted_per_attribute():
    asked = parse_request("shapes", "a red circle left of a blue square")
    right = [
        {"shape": "circle", "color": "red", "position": "left", "x": 0.2, "y": 0.5},
        {"shape": "square", "color": "blue", "position": "right", "x": 0.8, "y": 0.5},
    ]
    wrong_colour = [dict(right[0], color="green"), right[1]]
    swapped = [dict(right[0], x=0.8), dict(right[1], x=0.2)]
    s = score_shapes(asked, {"objects": wrong_colour, "count": 2})
    assert s["shape"] == [True, True] and s["color"] == [False, True] and not s["all_correct"]
    s = score_shapes(asked, {"objects": swapped, "count": 2})
    assert s["relation"] is False and s["color"] == [True, True] and not s["all_correct"]
    s = score_shapes(asked, {"objects": right[:1], "count": 1})
    assert s["count"] is False and s["shape"] == [True, False]
    s = score_shapes(asked, {"objects": right + [dict(right[0], x=0.5)], "count": 3})
    assert s["count"] is False and s["shape"] == [True, True]


def test_positions_are_asked_only_where_the_caption_says_them():
    req = parse_request(
        "shapes", "a green cross at the top left, a blue circle and a red square at the bottom"
    )
    assert req["count"] == 3 and req["relation"] is None
    assert req["objects"][0] == {"shape": "cross", "color": "green", "position": "top left"}
    assert "position" not in req["objects"][1]
    assert req["objects"][2]["position"] == "bottom"


def test_unreadable_prompts_say_what_was_expected():
    with pytest.raises(ConfigError, match="'a purple circle'.*expected 'a <colour> <shape>'"):
        parse_request("shapes", "a purple circle")
    with pytest.raises(ConfigError, match="tones prompt 'a flute at A4'"):
        parse_request("tones", "a flute at A4")
    with pytest.raises(ConfigError, match="no caption parser for dataset 'folder'"):
        parse_request("folder", "a cat")


def test_fft_pitch_finds_every_real_note():
    ds = build_dataset(DataConfig(name="tones", size=1024, num_eval=80, max_notes=2), "eval")
    errors = []
    for i in range(len(ds)):
        item = ds[i]
        wave = item["x"][0].numpy()
        req = parse_request("tones", item["text"])
        assert req == request_from_item("tones", item)
        for span, note in zip(split_notes(wave, ds.sample_rate, len(req["notes"])), req["notes"]):
            errors.append(cents(fft_pitch(wave[span], ds.sample_rate), note["pitch"]))
    assert np.max(np.abs(errors)) < 5  # a semitone is 100 cents
    assert np.isnan(fft_pitch(np.zeros(512), 8000))


def test_fft_pitch_of_a_pure_tone():
    sr, f = 8000, 311.127  # D#4, between the bins of a 1000-sample FFT
    wave = np.sin(2 * np.pi * f * np.arange(1000) / sr)
    assert abs(cents(fft_pitch(wave, sr), f)) < 1
    assert cents(2 * f, f) == pytest.approx(1200)
