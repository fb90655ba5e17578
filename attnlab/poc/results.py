"""The results of a PoC as data: per variant its metrics over training and sampling seeds, its cost,
and how it compares with the reference and with the best; written as results.json and results.csv."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from attnlab.io import write_json, write_text
from attnlab.poc.metrics import ALL, Metric, Stat, difference, within_noise


def metric_stats(per_train_seed: dict[int, dict[int, dict]], cost: dict) -> dict[str, Stat]:
    """Scores per training seed and sampling seed -> a Stat per metric (see `Stat.of_grid`); exact
    cost numbers -> a Stat with no spread."""
    rows = list(per_train_seed.values())
    keys = {k for per_seed in rows for scores in per_seed.values() for k in scores}
    out = {}
    for k in sorted(keys):
        s = Stat.of_grid([[scores.get(k) for scores in per_seed.values()] for per_seed in rows])
        if s is not None and k in ALL:
            out[k] = s
    for k, v in cost.items():
        if k in ALL and not ALL[k].per_seed and isinstance(v, (int, float)):
            out[k] = Stat(float(v), 0.0, (float(v),))
    return out


def stats_of(entry: dict) -> dict[str, Stat]:
    return {k: Stat.from_dict(s) for k, s in entry["metrics"].items()}


def compare(variants: Sequence[dict], reference: str) -> dict[str, dict[str, dict]]:
    """metric -> variant -> {vs_reference, within_noise_of_reference, rule, interval, best,
    within_noise_of_best}: how each variant differs from the reference and from the best."""
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
    d = None if ref is None else difference(s, ref)
    return {
        "vs_reference": None if ref is None else s.mean - ref.mean,
        "within_noise_of_reference": None if d is None else not d.real,
        "rule": None if d is None else d.rule,
        "interval": None if d is None or d.interval is None else list(d.interval),
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
    """results.json (everything) and results.csv (every measured value: one row per variant,
    training seed and sampling seed)."""
    return write_json(out / "results.json", results), write_text(
        out / "results.csv", results_csv(results["variants"])
    )


def results_csv(variants: Sequence[dict]) -> str:
    """One row per (variant, training seed, sampling seed) with every metric's value there; exact
    costs (FLOPs, parameters, memory) repeat on each row, training time is that seed's."""
    keys = [k for k in ALL if any(k in v["metrics"] for v in variants)]
    header = ["variant", "levels", "techniques", "trained_by", "train_seed", "seed", *keys]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for v in variants:
        head = [
            v["name"],
            " ".join(f"L{lv}" for lv in v["levels"]),
            " ".join(v["techniques"]),
            v["trained_by"],
        ]
        for ts, per_seed in v["per_train_seed"].items():
            exact = {**v["cost"], "train_seconds": v["train"].get(ts, {}).get("train_seconds")}
            for seed, scores in per_seed.items():
                row = [*head, ts, seed]
                for k in keys:
                    val = scores.get(k) if ALL[k].per_seed else exact.get(k)
                    row.append("" if val is None else f"{val:.6g}")
                w.writerow(row)
    return buf.getvalue()
