"""Requests: the attributes a prompt asks for, parsed from the built-in caption formats.

Alignment scores a sample against a *request*, not a string. A request is a plain dict:

    shapes: {"objects": [{"shape", "color", "position" (optional)}, ...], "count": n,
             "relation": "left of" | "above" | None}   (relation: objects[0] relative to objects[1])
    tones:  {"notes": [{"waveform", "note", "pitch" (Hz)}, ...]}   (played in this order)
    classes (digits, labelled folders): {"label": int}

`parse_request` reads the captions that `attnlab.data` writes ("a red circle at the top left",
"a red circle left of a blue square", "a sine tone at A4 then a saw tone at E5", "a handwritten
digit 3"); `request_from_item` builds the same dict from a dataset item's ground truth.
"""

from __future__ import annotations

import re

from attnlab.data.config import COLORS, SHAPES
from attnlab.data.shapes import POSITIONS
from attnlab.data.tones import NOTES, WAVEFORMS, pitch
from attnlab.errors import ConfigError

RELATIONS = ("left of", "above")
_PHRASE_TO_POSITION = {phrase: name for name, phrase in POSITIONS}
_OBJECT = re.compile(
    rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})(?: ({'|'.join(map(re.escape, _PHRASE_TO_POSITION))}))?"
)
_NOTE = re.compile(rf"an? ({'|'.join(WAVEFORMS)}) tone at ({'|'.join(NOTES)})")
_DIGIT = re.compile(r"a handwritten digit (\d)")


def _bad(dataset: str, caption: str, expected: str) -> ConfigError:
    return ConfigError(f"cannot read the {dataset} prompt {caption!r}: expected {expected}")


def _shape_object(dataset: str, part: str) -> dict:
    m = _OBJECT.fullmatch(part.strip())
    if m is None:
        raise _bad(dataset, part, "'a <colour> <shape>' with an optional position ('at the top left')")
    obj = {"shape": m.group(2), "color": m.group(1)}
    if m.group(3):
        obj["position"] = _PHRASE_TO_POSITION[m.group(3)]
    return obj


def parse_shapes(caption: str) -> dict:
    """ "a red circle left of a blue square" -> {"objects": [...], "count": 2, "relation": "left of"}."""
    text = caption.strip().lower()
    for relation in RELATIONS:
        if f" {relation} " in text:
            first, second = text.split(f" {relation} ", 1)
            objects = [_shape_object("shapes", first), _shape_object("shapes", second)]
            return {"objects": objects, "count": 2, "relation": relation}
    parts = re.split(r", | and ", text)
    objects = [_shape_object("shapes", p) for p in parts]
    return {"objects": objects, "count": len(objects), "relation": None}


def parse_tones(caption: str) -> dict:
    """ "a sine tone at A4 then a saw tone at E5" -> {"notes": [{"waveform", "note", "pitch"}, ...]}."""
    notes = []
    for part in caption.strip().split(" then "):
        m = _NOTE.fullmatch(part.strip())
        if m is None:
            raise _bad("tones", part, "'a <waveform> tone at <note>' joined by ' then '")
        notes.append({"waveform": m.group(1), "note": m.group(2), "pitch": pitch(m.group(2))})
    return {"notes": notes}


def parse_digits(caption: str) -> dict:
    m = _DIGIT.fullmatch(caption.strip().lower())
    if m is None:
        raise _bad("digits", caption, "'a handwritten digit <0-9>'")
    return {"label": int(m.group(1))}


PARSERS = {"shapes": parse_shapes, "tones": parse_tones, "digits": parse_digits}


def parse_request(dataset: str, caption: str) -> dict:
    """The request a built-in caption states (see the module docstring for its form)."""
    if dataset not in PARSERS:
        raise ConfigError(f"no caption parser for dataset {dataset!r}: expected one of {', '.join(PARSERS)}")
    return PARSERS[dataset](caption)


def request_from_item(dataset: str, item: dict) -> dict:
    """The request a dataset item fulfils, from its ground truth (not from its caption).

    Shapes items name a position only where their caption does (single objects, or 3-4 objects
    with positions on), so the request asks what the prompt asked.
    """
    if dataset == "shapes":
        asked = parse_shapes(item["text"])
        objects = [{k: o[k] for k in ("shape", "color")} for o in item["objects"]]
        for obj, said, true in zip(objects, asked["objects"], item["objects"]):
            if "position" in said:
                obj["position"] = true["position"]
        return {"objects": objects, "count": len(objects), "relation": asked["relation"]}
    if dataset == "points":
        from attnlab.evaluate.pointcloud import request_of

        return request_of(item["text"])
    if dataset == "tones":
        # Timing stays out: a generated clip is cut into notes by its own loudness, as any clip is.
        return {"notes": [{k: n[k] for k in ("waveform", "note", "pitch")} for n in item["notes"]]}
    if "label" not in item:
        raise ConfigError(f"dataset {dataset!r} items carry no 'label': class alignment needs labelled data")
    return {"label": int(item["label"])}
