"""The results of a PoC as data: per variant its metrics over seeds, its cost, and how it compares with
the reference and with the best; written as results.json and results.csv."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from attnlab.io import write_json, write_text
from attnlab.poc.metrics import ALL, Metric, Stat, within_noise


def metric_stats(per_seed: dict[int, dict], cost: dict) -> dict[str, Stat]:
    """Per-seed scores -> a Stat per metric over seeds; exact cost numbers -> a Stat with no spread."""
    keys = {k for scores in per_seed.values() for k in scores}
    out = {}
    for k in sorted(keys):
        s = Stat.of([scores.get(k) for scores in per_seed.values()])
        if s is not None and k in ALL:
            out[k] = s
    for k, v in cost.items():
        if k in ALL and not ALL[k].per_seed and isinstance(v, (int, float)):
            out[k] = Stat(float(v), 0.0, (float(v),))
    return out


def stats_of(entry: dict) -> dict[str, Stat]:
    return {k: Stat(s["mean"], s["std"], tuple(s["values"])) for k, s in entry["metrics"].items()}


def compare(variants: Sequence[dict], reference: str) -> dict[str, dict[str, dict]]:
    """metric -> variant -> {vs_reference, within_noise_of_reference, best, within_noise_of_best}."""
    stats = {v["name"]: stats_of(v) for v in variants}
    out: dict[str, dict[str, dict]] = {}
    for key in sorted({k for s in stats.values() for k in s}):
        metric = ALL[key]
        have = {n: s[key] for n, s in stats.items() if key in s}
        best = best_name(metric, have)
        ref = have.get(reference)
        out[key] = {n: _comparison(s, ref, have[best], s.mean == have[best].mean) for n, s in have.items()}
    return out


def _comparison(s: Stat, ref: Stat | None, best: Stat, is_best: bool) -> dict:
    return {
        "vs_reference": None if ref is None else s.mean - ref.mean,
        "within_noise_of_reference": None if ref is None else within_noise(s, ref),
        "best": is_best,
        "within_noise_of_best": within_noise(s, best),
    }


def best_name(metric: Metric, have: dict[str, Stat]) -> str:
    """The variant with the best mean (the first listed wins a tie)."""
    names = list(have)
    best = names[0]
    for n in names[1:]:
        if metric.better(have[n].mean, have[best].mean):
            best = n
    return best


def write_results(out: Path, results: dict) -> tuple[Path, Path]:
    """results.json (everything) and results.csv (one row per variant: mean and std per metric)."""
    return write_json(out / "results.json", results), write_text(
        out / "results.csv", results_csv(results["variants"])
    )


def results_csv(variants: Sequence[dict]) -> str:
    keys = [k for k in ALL if any(k in v["metrics"] for v in variants)]
    header = ["variant", "levels", "techniques", "trained_by"] + [
        f"{k}_{s}" for k in keys for s in ("mean", "std")
    ]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for v in variants:
        row = [
            v["name"],
            " ".join(f"L{lv}" for lv in v["levels"]),
            " ".join(v["techniques"]),
            v["trained_by"],
        ]
        for k in keys:
            s = v["metrics"].get(k)
            row += [f"{s['mean']:.6g}", f"{s['std']:.6g}"] if s else ["", ""]
        w.writerow(row)
    return buf.getvalue()
