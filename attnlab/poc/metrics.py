"""The metrics a PoC reports: how each is named, formatted and compared, and the seed statistics
(mean and spread over training and sampling seeds) and the noise model that decides whether two
variants really differ."""

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
    # point clouds (PointFlow's protocol under the Chamfer distance; 1-NNA: 50% is best)
    Metric("mmd_cd", "MMD-CD", "quality", True, _sig),
    Metric("cov_cd", "COV-CD", "quality", False, _pct),
    Metric("nna_cd", "1-NNA-CD", "quality", True, _pct),
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
    Metric("layout_acc", "layout", "alignment", False, _pct),
    Metric("color_acc", "colour", "alignment", False, _pct),
    Metric("position_acc", "position", "alignment", False, _pct),
    Metric("count_acc", "count", "alignment", False, _pct),
    Metric("relation_acc", "relation", "alignment", False, _pct),
    Metric("pitch_acc", "pitch", "alignment", False, _pct),
    Metric("pitch_cents_median", "pitch error (cents)", "alignment", True, _num(0)),
    Metric("waveform_acc", "waveform", "alignment", False, _pct),
    Metric(
        "clip_score",
        "CLIP score",
        "alignment",
        False,
        _num(2),
        say="CLIP score {value}",
    ),
    Metric(
        "mask_iou",
        "heat-map IoU (masked words)",
        "alignment",
        False,
        _num(3),
        say="heat-map IoU {value} of the masked words with their objects",
    ),
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
HEADLINE = {
    "quality": ("fid", "kid_mean"),
    "alignment": ("all_correct", "class_acc", "clip_score"),
    "cost": ("latency_s",),
}


@dataclass(frozen=True)
class Stat:
    """A metric over seeds.

    With one training seed: the mean and sample standard deviation (n - 1) over the sampling seeds,
    and `values` the sampling seeds' values. With several: the mean and standard deviation of the
    training seeds' means (each over that training seed's sampling seeds), and `values` those means.
    `by_train_seed`: per training seed, the value of each sampling seed (None where none was
    measured), in the PoC's seed order: what the noise model pairs (see `difference`).
    """

    mean: float
    std: float
    values: tuple[float, ...]
    by_train_seed: tuple[tuple[float | None, ...], ...] = ()

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat | None:
        """The Stat of one training seed's sampling-seed values (None and nan are left out)."""
        return cls.of_grid([values])

    @classmethod
    def of_grid(cls, rows: Sequence[Sequence[float | None]]) -> Stat | None:
        """The Stat of values per (training seed, sampling seed); None when nothing was measured."""
        grid = tuple(tuple(_finite(v) for v in row) for row in rows)
        kept = [[v for v in row if v is not None] for row in grid]
        kept = [row for row in kept if row]
        if not kept:
            return None
        if len(kept) == 1:
            vals = tuple(kept[0])
        else:
            vals = tuple(float(np.mean(row)) for row in kept)
        std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        return cls(float(np.mean(vals)), std, vals, grid)

    @property
    def train_seeds(self) -> int:
        """How many training seeds measured this metric (1 for a Stat without a grid)."""
        return max(1, sum(any(v is not None for v in row) for row in self.by_train_seed))

    def to_dict(self) -> dict:
        out = {"mean": self.mean, "std": self.std, "values": list(self.values)}
        if self.by_train_seed:
            out["by_train_seed"] = [list(row) for row in self.by_train_seed]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Stat:
        grid = tuple(tuple(row) for row in d.get("by_train_seed", ()))
        return cls(d["mean"], d["std"], tuple(d["values"]), grid)


def _finite(v: float | None) -> float | None:
    if v is None or not math.isfinite(float(v)):
        return None
    return float(v)


# The noise model: when a difference between two variants is real


@dataclass(frozen=True)
class Difference:
    """How `a` differs from `b` on one metric.

    Attributes:
        diff: mean of a minus mean of b (with several training seeds: the mean of the paired
            per-training-seed differences).
        real: beyond the noise, by `rule`.
        rule: "sampling" (one training seed: |diff| > sqrt(std_a^2 + std_b^2) over sampling seeds),
            "two seeds" (both training seeds' differences have the same sign and each exceeds twice
            its sampling standard error) or "t interval" (3 or more training seeds: the 95% t
            interval of the per-training-seed differences excludes 0).
        interval: the 95% t interval ("t interval" only).
        per_train_seed: each training seed's difference (averaged over its sampling seeds) and the
            standard error of it over the sampling seeds.
    """

    diff: float
    real: bool
    rule: str
    interval: tuple[float, float] | None = None
    per_train_seed: tuple[tuple[float, float], ...] = ()


def difference(a: Stat, b: Stat) -> Difference:
    """Whether `a` and `b` really differ, under the noise model their training seeds allow.

    Sampling seed k of training seed t of `a` is paired with the same (t, k) of `b`: in a PoC both
    drew the same prompts from the same noise with models trained from the same seed."""
    pairs = _paired(a, b)
    if len(pairs) >= 3:
        ds = np.array([d for d, _ in pairs])
        half = t_quantile(len(ds)) * float(np.std(ds, ddof=1)) / math.sqrt(len(ds))
        m = float(np.mean(ds))
        return Difference(m, abs(m) > half, "t interval", (m - half, m + half), tuple(pairs))
    if len(pairs) == 2:
        (d1, se1), (d2, se2) = pairs
        same_sign = d1 * d2 > 0
        real = same_sign and abs(d1) > 2 * se1 and abs(d2) > 2 * se2
        return Difference((d1 + d2) / 2, real, "two seeds", None, tuple(pairs))
    diff = a.mean - b.mean
    return Difference(diff, abs(diff) > math.hypot(a.std, b.std), "sampling", None, tuple(pairs))


def _paired(a: Stat, b: Stat) -> list[tuple[float, float]]:
    """(difference, its standard error over sampling seeds) per training seed both measured; none
    when either has a single training seed (the sampling rule needs no pairs)."""
    if a.train_seeds < 2 or b.train_seeds < 2:
        return []
    out = []
    for ra, rb in zip(a.by_train_seed, b.by_train_seed):
        d = [x - y for x, y in zip(ra, rb) if x is not None and y is not None]
        if d:
            se = float(np.std(d, ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else math.inf
            out.append((float(np.mean(d)), se))
    return out


def t_quantile(n: int, level: float = 0.95) -> float:
    """The two-sided `level` quantile of Student's t with n - 1 degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, n - 1))


def within_noise(a: Stat, b: Stat) -> bool:
    """Not a real difference under the noise model (see `difference`)."""
    return not difference(a, b).real


def resolution(ref: Stat) -> float | None:
    """The smallest difference from `ref` this budget could call real, for a variant as noisy as
    `ref` whose noise is independent of it (an architectural variant: another trained model):
    sqrt(2) std with one training seed; twice the standard error of a difference over the sampling
    seeds with two; the half-width of the 95% t interval over the training seeds with more."""
    n = ref.train_seeds
    if n >= 3:
        return t_quantile(n) * math.sqrt(2) * ref.std / math.sqrt(n)
    if n == 2:
        rows = [[v for v in row if v is not None] for row in ref.by_train_seed]
        ses = [float(np.std(r, ddof=1)) / math.sqrt(len(r)) for r in rows if len(r) > 1]
        return 2 * math.sqrt(2) * max(ses) if ses else None
    return math.sqrt(2) * ref.std


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
