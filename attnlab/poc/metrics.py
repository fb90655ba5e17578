"""The metrics a PoC reports: how each is named, formatted and compared, and the seed statistics
(mean and spread over sampling seeds) that decide whether two variants really differ."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Metric:
    """One reported number.

    Attributes:
        key: its key in the per-seed scores or the cost record.
        label: the column header.
        family: "quality", "alignment" or "cost".
        lower_is_better: the direction of "better".
        fmt: value -> text.
        per_seed: measured once per sampling seed (so it has a spread), else once per variant.
    """

    key: str
    label: str
    family: str
    lower_is_better: bool
    fmt: Callable[[float], str]
    per_seed: bool = True
    say: str = "{label} {value}"  # how a sentence of the summary states a value

    def sentence(self, value: str) -> str:
        return self.say.format(label=self.label, value=value)

    def better(self, a: float, b: float) -> bool:
        return a < b if self.lower_is_better else a > b


def _num(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:.{digits}f}"


def _sig(v: float) -> str:
    """Three significant digits, without exponents for the usual range (KID spans 1e-4 to 1e3)."""
    if v == 0 or abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.1e}"


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _si(unit: str) -> Callable[[float], str]:
    def fmt(v: float) -> str:
        for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= div:
                return f"{v / div:.2f} {prefix}{unit}"
        return f"{v:.0f} {unit}".strip()

    return fmt


def _seconds(v: float) -> str:
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s" if v < 60 else f"{v / 60:.1f} min"


def _bytes(v: float) -> str:
    return _si("B")(v)


QUALITY = [
    Metric("fid", "FID", "quality", True, _num(2)),
    Metric("kid_mean", "KID", "quality", True, _sig),
]
ALIGNMENT = [
    Metric(
        "all_correct",
        "all asked right",
        "alignment",
        False,
        _pct,
        say="{value} of samples with everything asked right",
    ),
    Metric("class_acc", "class accuracy", "alignment", False, _pct, say="{value} class accuracy"),
    Metric("shape_acc", "shape", "alignment", False, _pct),
    Metric("color_acc", "colour", "alignment", False, _pct),
    Metric("position_acc", "position", "alignment", False, _pct),
    Metric("count_acc", "count", "alignment", False, _pct),
    Metric("relation_acc", "relation", "alignment", False, _pct),
    Metric("pitch_acc", "pitch", "alignment", False, _pct),
    Metric("pitch_cents_median", "pitch error (cents)", "alignment", True, _num(0)),
    Metric("waveform_acc", "waveform", "alignment", False, _pct),
    Metric(
        "heatmap_iou",
        "heat-map IoU (shape words)",
        "alignment",
        False,
        _num(3),
        say="heat-map IoU {value} of shape words with their objects",
    ),
]
COST = [
    Metric(
        "latency_s", "latency per sample", "cost", True, _seconds, say="{value} sampling latency per sample"
    ),
    Metric("flops_per_sample", "FLOPs per sample", "cost", True, _si("FLOP"), per_seed=False),
    Metric("flops_per_call", "FLOPs per denoiser call", "cost", True, _si("FLOP"), per_seed=False),
    Metric("params", "parameters", "cost", True, _si(""), per_seed=False),
    Metric("peak_mem_bytes", "peak memory", "cost", True, _bytes, per_seed=False),
    Metric("train_seconds", "training time", "cost", True, _seconds, per_seed=False),
]
ALL = {m.key: m for m in QUALITY + ALIGNMENT + COST}
# The headline number of each family: what "best quality", "best alignment", "lowest cost" mean.
HEADLINE = {"quality": ("fid", "kid_mean"), "alignment": ("all_correct", "class_acc"), "cost": ("latency_s",)}


@dataclass(frozen=True)
class Stat:
    """A metric over sampling seeds: mean, sample standard deviation (n - 1) and the values."""

    mean: float
    std: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat | None:
        vals = tuple(float(v) for v in values if v is not None and math.isfinite(float(v)))
        if not vals:
            return None
        std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        return cls(float(np.mean(vals)), std, vals)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "values": list(self.values)}


def within_noise(a: Stat, b: Stat) -> bool:
    """Two variants differ by no more than their combined seed spread, sqrt(std_a^2 + std_b^2)."""
    return abs(a.mean - b.mean) <= math.hypot(a.std, b.std)


def show(metric: Metric, s: Stat | None) -> str:
    """'12.30 ± 0.85' (per-seed metrics) or '1.20 MFLOP' (exact ones); '-' when not measured."""
    if s is None:
        return "–"
    if not metric.per_seed:
        return metric.fmt(s.mean)
    return f"{metric.fmt(s.mean)} ± {metric.fmt(s.std)}"


def headline(family: str, available: Sequence[str]) -> Metric | None:
    """The headline metric of a family among the measured ones."""
    for key in HEADLINE[family]:
        if key in available:
            return ALL[key]
    return None
