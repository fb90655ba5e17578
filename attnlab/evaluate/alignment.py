"""Condition alignment: does a sample show what its prompt asked for?

Each sample is read by the dataset's evaluator (and, for tones, by an FFT pitch oracle) and
compared with its request (`attnlab.evaluate.prompts`):

    shapes: requested objects are matched one-to-one to found objects (Hungarian assignment,
            Kuhn 1955, on the number of agreeing attributes); per-attribute accuracy over requested
            objects (shape, color, and position where asked), count and relation accuracy per sample,
            and `all_correct`: the share of samples with every asked attribute right.
    tones:  the clip is cut into the asked number of notes at its quietest points; each note's
            FFT pitch is compared with the asked pitch in cents (right when within half a semitone,
            i.e. it names the asked note), its waveform is the evaluator's; plus count and all_correct.
    classes (digits, labelled folders): class accuracy of the evaluator's prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.evaluate.evaluator import BUILTIN, Evaluator
from attnlab.evaluate.pitch import SEMITONE_CENTS, cents, fft_pitch, split_notes
from attnlab.evaluate.prompts import parse_request

ATTRIBUTES = ("shape", "color", "position")


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


# Shapes


def _match(asked: list[dict], found: list[dict]) -> list[dict | None]:
    """For each asked object, the found object assigned to it (None when there are fewer)."""
    if not found:
        return [None] * len(asked)
    agree = np.array([[sum(a.get(k) == f[k] for k in ATTRIBUTES if k in a) for f in found] for a in asked])
    rows, cols = linear_sum_assignment(-agree)
    pairs = dict(zip(rows.tolist(), cols.tolist()))
    return [found[pairs[i]] if i in pairs else None for i in range(len(asked))]


def _relation_holds(relation: str, first: dict | None, second: dict | None) -> bool:
    if first is None or second is None:
        return False
    return first["x"] < second["x"] if relation == "left of" else first["y"] < second["y"]


def score_shapes(request: dict, found: dict) -> dict:
    """Per-sample scores of one shapes sample: per asked attribute a list of bools, and the rest."""
    matched = _match(request["objects"], found["objects"])
    hits = {
        k: [m is not None and m[k] == a[k] for a, m in zip(request["objects"], matched) if k in a]
        for k in ATTRIBUTES
    }
    score = {**hits, "count": found["count"] == request["count"]}
    if request.get("relation"):
        score["relation"] = _relation_holds(request["relation"], *matched[:2])
    score["all_correct"] = (
        all(all(v) for v in hits.values()) and score["count"] and score.get("relation", True)
    )
    return score


def _summarise_shapes(scores: list[dict]) -> dict:
    out = {f"{k}_acc": _mean([h for s in scores for h in s[k]]) for k in ATTRIBUTES}
    out["count_acc"] = _mean([s["count"] for s in scores])
    out["relation_acc"] = _mean([s["relation"] for s in scores if "relation" in s])
    out["all_correct"] = _mean([s["all_correct"] for s in scores])
    return out


# Tones


def score_tones(request: dict, wave: np.ndarray, out: dict, b: int, evaluator: Evaluator) -> dict:
    """Per-sample scores of one clip: FFT pitch and evaluator waveform per asked note, and count."""
    sr, notes = evaluator.sample_rate, request["notes"]
    context = evaluator.decode_context()
    found = evaluator.task.decode({k: v[b : b + 1] for k, v in out.items()}, **context)[0]
    errors, waveforms = [], []
    for span, asked in zip(split_notes(wave, sr, len(notes)), notes):
        errors.append(cents(fft_pitch(wave[span], sr), asked["pitch"]))
        found_wave = evaluator.task.waveform_in(out, b, span.start / sr, span.stop / sr, context["frame_s"])
        waveforms.append(found_wave == asked["waveform"])
    pitch_ok = [abs(e) < SEMITONE_CENTS / 2 for e in errors]  # nan compares False: silence is wrong
    count_ok = found["count"] == len(notes)
    return {
        "cents": errors,
        "pitch": pitch_ok,
        "waveform": waveforms,
        "count": count_ok,
        "all_correct": all(pitch_ok) and all(waveforms) and count_ok,
    }


def _summarise_tones(scores: list[dict]) -> dict:
    errors = np.abs([e for s in scores for e in s["cents"]])
    return {
        "pitch_acc": _mean([h for s in scores for h in s["pitch"]]),
        "pitch_cents_median": float(np.nanmedian(errors)) if np.isfinite(errors).any() else math.nan,
        "waveform_acc": _mean([h for s in scores for h in s["waveform"]]),
        "count_acc": _mean([s["count"] for s in scores]),
        "all_correct": _mean([s["all_correct"] for s in scores]),
    }


# Entry point


def _requests(dataset: str, requests: Sequence[dict | str | int]) -> list[dict]:
    out = []
    for r in requests:
        if isinstance(r, str):
            r = parse_request(dataset, r)
        elif isinstance(r, int):
            r = {"label": r}
        out.append(r)
    return out


def _evaluator_for(dataset: str, evaluator: Evaluator | str | None) -> Evaluator:
    if isinstance(evaluator, Evaluator):
        return evaluator
    if evaluator is None and dataset not in BUILTIN:
        raise ConfigError(
            f"dataset {dataset!r} has no built-in evaluator: train one with `attnlab evaluator train` and pass it"
        )
    return Evaluator.load(evaluator or dataset)


def alignment(
    dataset: str,
    samples: Tensor,
    requests: Sequence[dict | str | int],
    evaluator: Evaluator | str | None = None,
    *,
    sample_rate: int | None = None,
    per_sample: bool = False,
) -> dict:
    """How well samples match what was asked.

    Args:
        dataset: "shapes", "tones", "digits" or any labelled dataset (scored as classes).
        samples: (N, C, *spatial) samples in [-1, 1].
        requests: N requests: dicts (see `attnlab.evaluate.prompts`), built-in captions, or class ids.
        evaluator: an Evaluator, a name/path for `Evaluator.load`, or None for the dataset's built-in.
        sample_rate: audio only: the samples' rate, when it is not the evaluator's (they are resampled).
        per_sample: also return each sample's scores under "per_sample".

    Returns:
        shapes: shape_acc, color_acc, position_acc, count_acc, relation_acc, all_correct;
        tones: pitch_acc, pitch_cents_median, waveform_acc, count_acc, all_correct;
        classes: class_acc. Always "n"; an accuracy with nothing to score is nan.
    """
    if len(samples) != len(requests):
        raise ConfigError(f"alignment got {len(samples)} samples but {len(requests)} requests")
    ev = _evaluator_for(dataset, evaluator)
    reqs = _requests(dataset, requests)
    samples = ev.resample(samples, sample_rate)
    kind = ev.task.kind
    if kind == "shapes":
        scores = [score_shapes(r, f) for r, f in zip(reqs, ev.predict(samples))]
        summary = _summarise_shapes(scores)
    elif kind == "tones":
        out = ev.outputs(samples)
        waves = samples[:, 0].double().numpy()
        scores = [score_tones(r, waves[b], out, b, ev) for b, r in enumerate(reqs)]
        summary = _summarise_tones(scores)
    elif kind == "classes":
        scores = [{"class": p["label"] == r["label"]} for p, r in zip(ev.predict(samples), reqs)]
        summary = {"class_acc": _mean([s["class"] for s in scores])}
    else:
        raise ConfigError(
            f"evaluator {ev.name!r} ({kind}) predicts no labels: it gives features for FID/KID only"
        )
    summary["n"] = len(samples)
    if per_sample:
        summary["per_sample"] = scores
    return summary
