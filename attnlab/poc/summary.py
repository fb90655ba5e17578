"""The summary a PoC report opens with, in plain words: the best design for quality, for condition
alignment and for cost, which differences are within noise (under the noise model the training
seeds allow), the smallest difference the budget could call real, and a recommendation for the
priority that never adopts an architectural variant trained from one seed."""

from __future__ import annotations

import math
from collections.abc import Sequence

from attnlab.poc.metrics import ALL, Metric, Stat, headline, resolution, show, within_noise
from attnlab.poc.results import best_name, stats_of
from attnlab.techniques import LEVELS

FAMILY_WORDS = {"quality": "quality", "alignment": "condition alignment", "cost": "cost"}
PRIORITY_FAMILY = {"quality": "quality", "control": "alignment", "speed": "cost"}


def level_phrase(levels: Sequence[int]) -> str:
    """'an L3 design (time: how the timestep shapes attention)', or the reference's wording."""
    if not levels:
        return "the reference design (no technique added)"
    names = " + ".join(f"L{lv}" for lv in levels)
    what = "; ".join(LEVELS[lv] for lv in levels)
    return f"an {names} design ({what})"


class Summary:
    """Reads the variants' stats once and answers the summary's questions.

    Args:
        variants: results.json variant entries (with "metrics" and "levels").
        reference: the reference variant's name.
        floor: real data scored like a variant ({"metrics": ...}), quoted for scale; or None.
    """

    def __init__(self, variants: Sequence[dict], reference: str, floor: dict | None = None):
        self.floor = stats_of(floor) if floor else {}
        self.variants = {v["name"]: v for v in variants}
        self.stats = {v["name"]: stats_of(v) for v in variants}
        self.reference = reference
        keys = {k for s in self.stats.values() for k in s}
        self.headlines = {f: headline(f, sorted(keys)) for f in ("quality", "alignment", "cost")}
        self.train_seeds = max((len(v.get("train_seeds", [0])) for v in variants), default=1)
        self.sampling_seeds = max(
            (len(row) for st in self.stats.values() for x in st.values() for row in x.by_train_seed),
            default=0,
        )

    @property
    def replicated(self) -> bool:
        """Trained from more than one seed: architectural differences are replicated."""
        return self.train_seeds > 1

    def architectural(self, name: str) -> bool:
        """Whether a variant samples another trained model than the reference's."""
        ref = self.variants.get(self.reference)
        return ref is not None and self.variants[name]["trained_by"] != ref["trained_by"]

    def unreplicated(self, name: str) -> bool:
        """An architectural variant of a single-training-seed PoC: its difference from the reference
        includes one training run's luck, which sampling seeds do not measure."""
        return not self.replicated and self.architectural(name)

    # Facts

    def have(self, metric: Metric) -> dict[str, Stat]:
        return {n: s[metric.key] for n, s in self.stats.items() if metric.key in s}

    def best(self, family: str) -> tuple[Metric, str, list[str]] | None:
        """(headline metric, best variant, variants within noise of the best) of a family."""
        metric = self.headlines[family]
        if metric is None:
            return None
        have = self.have(metric)
        best = best_name(metric, have)
        ties = [n for n in have if n != best and within_noise(have[n], have[best])]
        return metric, best, ties

    def noise_ties_with_reference(self) -> dict[str, list[str]]:
        """variant -> the headline metrics on which it is within noise of the reference."""
        out: dict[str, list[str]] = {}
        for metric in filter(None, self.headlines.values()):
            have = self.have(metric)
            ref = have.get(self.reference)
            for n, s in have.items():
                if n != self.reference and ref is not None and within_noise(s, ref):
                    out.setdefault(n, []).append(metric.label)
        return out

    # Words

    @property
    def _ref(self) -> str:
        """'reference `base`', or just 'reference' when the variant is called that."""
        return "reference" if self.reference == "reference" else f"reference `{self.reference}`"

    @property
    def _the_ref(self) -> str:
        return f"the {self._ref}"

    def _val(self, name: str, metric: Metric) -> str:
        return show(metric, self.stats[name].get(metric.key))

    def _who(self, name: str) -> str:
        lv = self.variants[name]["levels"]
        tag = ", ".join(f"L{x}" for x in lv) if lv else "reference"
        return f"`{name}`" if tag == name else f"`{name}` ({tag})"

    def best_sentence(self, family: str) -> str | None:
        found = self.best(family)
        if found is None:
            return None
        metric, best, ties = found
        label = {"quality": "Best quality", "alignment": "Best condition alignment", "cost": "Lowest cost"}[
            family
        ]
        text = f"**{label}:** {self._who(best)}, {metric.sentence(self._val(best, metric))}"
        if (
            best != self.reference
            and self.reference in self.stats
            and metric.key in self.stats[self.reference]
        ):
            text += f" ({self._ref}: {self._val(self.reference, metric)})"
        if ties:
            text += f"; {_names(ties)} {'is' if len(ties) == 1 else 'are'} within noise of it"
        if metric.key in self.floor:
            text += f". Real training data scores {show(metric, self.floor[metric.key])} with as many samples"
        if family == "cost":
            text += self._exact_costs()
        return text + "."

    def _exact_costs(self) -> str:
        parts = []
        for key, what in (("flops_per_sample", "fewest FLOPs per sample"), ("params", "fewest parameters")):
            have = self.have(ALL[key])
            if len({s.mean for s in have.values()}) > 1:  # all equal says nothing about the designs
                n = best_name(ALL[key], have)
                parts.append(f"{what}: `{n}` ({ALL[key].fmt(have[n].mean)})")
        return f". Exactly counted, {'; '.join(parts)}" if parts else ""

    def rule(self) -> str:
        """When a difference counts as real here, in words."""
        n = self.train_seeds
        if n >= 3:
            return f"its 95% t interval over the {n} training seeds excludes 0"
        if n == 2:
            return (
                "both training seeds' differences have the same sign and each exceeds twice its "
                "standard error over the sampling seeds"
            )
        return "it exceeds the spread over the sampling seeds, √(std₁² + std₂²)"

    def noise_sentence(self) -> str:
        ties = self.noise_ties_with_reference()
        if not ties:
            return (
                f"**Within noise:** none; every variant differs from {self._the_ref} on every headline "
                f"metric by more than the noise (a difference is real when {self.rule()})."
            )
        listed = "; ".join(f"`{n}` on {', '.join(ms)}" for n, ms in ties.items())
        return (
            f"**Within noise** of {self._the_ref} (a difference is real only when {self.rule()}; "
            f"these are not): {listed}."
        )

    @property
    def pretrained(self) -> bool:
        """Every variant samples one pretrained pipeline (a pipeline PoC): nothing was trained."""
        return all(e.get("trained_by") == "pipeline" for e in self.variants.values())

    @property
    def _more(self) -> str:
        return (
            "more samples, prompts or seeds" if self.pretrained else "more training steps, samples or seeds"
        )

    def replication_sentence(self) -> str | None:
        """With one training seed: which differences are unreplicated and which are sampling noise only."""
        if self.replicated:
            return None
        if self.pretrained:
            return (
                "**Sampling seeds only:** nothing was trained (every variant samples the one pretrained "
                "pipeline), so these verdicts rest on the sampling seeds' spread; more seeds or prompts narrow it."
            )
        arch = [n for n in self.variants if n != self.reference and self.architectural(n)]
        free = [n for n in self.variants if n != self.reference and not self.architectural(n)]
        parts = []
        if arch:
            parts.append(
                f"every model was trained from one seed, so the differences of {_names(arch)} from "
                f"{self._the_ref} (other architectures, other trained models) are unreplicated: a new "
                "training seed can move them by more than the sampling spread, and none of them is "
                "recommended for adoption on this evidence. Rerun with `train_seeds: [0, 1, 2]` to settle them"
            )
        if free:
            parts.append(
                f"{_names(free)} apply at sampling time to the reference's trained model, so "
                f"{'its' if len(free) == 1 else 'their'} noise is the sampling seeds' only"
            )
        if not parts:
            return None
        return "**Unreplicated:** " + "; ".join(parts) + "."

    def smallest(self) -> dict[str, float | None]:
        """Quality and alignment headline -> the smallest difference from the reference this budget
        could call real (see `resolution`)."""
        ref = self.stats.get(self.reference, {})
        metrics = [self.headlines[f] for f in ("quality", "alignment")]
        return {m.key: resolution(ref[m.key]) for m in metrics if m is not None and m.key in ref}

    def resolution_sentence(self) -> str | None:
        """The smallest difference from the reference this budget could call real, per headline."""
        parts = [
            f"{ALL[key].label} {_amount(ALL[key], r)}"
            for key, r in self.smallest().items()
            if r is not None and math.isfinite(r)
        ]
        if not parts:
            return None
        n = self.train_seeds
        budget = f"{n} training seed{'s' if n > 1 else ''} × {self.sampling_seeds} sampling seeds"
        if self.pretrained:
            budget = f"{self.sampling_seeds} sampling seeds of the pretrained pipeline"
        how = {
            1: "√2 times the reference's spread over sampling seeds",
            2: "twice the standard error of a difference over the sampling seeds, per training seed",
        }.get(n, f"the half-width of a 95% t interval over {n} training seeds")
        return (
            f"**Smallest difference this budget could call real** ({budget}; {how}, for a variant as noisy "
            f"as the reference): {'; '.join(parts)}."
        )

    def recommendation(self, priority: str) -> str:
        family = PRIORITY_FAMILY[priority]
        if priority == "speed":
            return self._speed()
        found = self.best(family)
        if found is None:
            return f"**Recommendation ({priority}):** nothing measured the {FAMILY_WORDS[family]} here; add it to `metrics`."
        metric, best, _ = found
        head = f"**Recommendation ({priority}):** "
        ref = self.have(metric).get(self.reference)
        if best == self.reference:
            return (
                head
                + f"keep {self._the_ref}, {level_phrase([])}: no variant beat it on {metric.label}."
                + self._also(family)
            )
        level = level_phrase(self.variants[best]["levels"])
        if self.unreplicated(best):
            return (
                head
                + (
                    f"keep {self._the_ref} for now. `{best}`, {level}, scored the best {metric.label}, but it is "
                    f"another architecture trained from one seed: rerun with `train_seeds: [0, 1, 2]` before adopting it."
                )
                + self._also(family)
            )
        if ref is not None and within_noise(self.have(metric)[best], ref):
            return (
                head
                + (
                    f"`{best}`, {level}, scored the best {metric.label}, but within noise of the reference; the evidence "
                    f"is weak at this budget. Keep the reference, or rerun with a larger budget ({self._more}) "
                    f"before adopting `{best}`."
                )
                + self._also(family)
            )
        return (
            head
            + f"use `{best}`, {level}: its {metric.label} beats the reference by more than the noise{self._price(best)}"
            + self._trade(best, family)
            + "."
        )

    def _trade(self, name: str, family: str) -> str:
        """What a recommended variant gives up: the other quality or alignment headline on which it
        is worse than the reference beyond the noise."""
        lost = []
        for other in ("quality", "alignment"):
            metric = self.headlines[other]
            have = self.have(metric) if metric is not None and other != family else {}
            s, ref = have.get(name), have.get(self.reference)
            if (
                s is not None
                and ref is not None
                and metric.better(ref.mean, s.mean)
                and not within_noise(s, ref)
            ):
                lost.append(
                    f"{metric.label} ({self._val(name, metric)} against {self._val(self.reference, metric)})"
                )
        if not lost:
            return ""
        return f"; it pays with worse {' and '.join(lost)}, beyond the noise: weigh that before adopting it"

    def _also(self, family: str) -> str:
        """Variants no worse than the reference beyond the noise on quality and alignment that beat it
        beyond the noise on another headline: where a larger run should look first."""
        picks = []
        for other in ("quality", "alignment", "cost"):
            om = self.headlines[other]
            have = self.have(om) if om is not None and other != family else {}
            ref = have.get(self.reference)
            for n, st in have.items():
                if ref is None or n == self.reference or not self._keeps_quality(n):
                    continue
                if om.better(st.mean, ref.mean) and not within_noise(st, ref):
                    picks.append(
                        f"{self._who(n)} on {om.label} ({self._val(n, om)} against {self._val(self.reference, om)})"
                    )
        if not picks:
            return ""
        return (
            f" Worth a larger run: {'; '.join(picks)}, beyond the noise, with quality and alignment no worse than the "
            "reference's."
        )

    def _price(self, name: str) -> str:
        lat = self.have(ALL["latency_s"])
        if name not in lat or self.reference not in lat:
            return ""
        ratio = lat[name].mean / max(lat[self.reference].mean, 1e-12)
        return f", at {ratio:.2f}x the reference's sampling latency"

    def _speed(self) -> str:
        head = "**Recommendation (speed):** "
        lat = self.have(ALL["latency_s"])
        if self.reference not in lat:
            return head + "latency was not measured; add `cost` to `metrics`."
        ok = [n for n in lat if self._keeps_quality(n)]
        fastest = min(ok, key=lambda n: lat[n].mean)
        if fastest == self.reference or within_noise(lat[fastest], lat[self.reference]):
            return (
                head
                + f"keep {self._the_ref}: no variant that keeps its quality and alignment samples faster beyond the noise."
            )
        if self.unreplicated(fastest):
            return head + (
                f"keep {self._the_ref} for now. `{fastest}` samples fastest with quality and alignment no worse, but it "
                "is another architecture trained from one seed: rerun with `train_seeds: [0, 1, 2]` before adopting it."
            )
        gain = 1 - lat[fastest].mean / lat[self.reference].mean
        return head + (
            f"use `{fastest}`, {level_phrase(self.variants[fastest]['levels'])}: {100 * gain:.0f}% less sampling time per sample "
            f"than the reference, with quality and alignment no worse beyond the noise."
        )

    def _keeps_quality(self, name: str) -> bool:
        """Not worse than the reference beyond the noise on the quality and alignment headlines."""
        for family in ("quality", "alignment"):
            metric = self.headlines[family]
            if metric is None:
                continue
            have = self.have(metric)
            s, ref = have.get(name), have.get(self.reference)
            if s is None or ref is None:
                continue
            if metric.better(ref.mean, s.mean) and not within_noise(s, ref):
                return False
        return True

    def sentences(self, priority: str) -> list[str]:
        found = [self.best_sentence(f) for f in ("quality", "alignment", "cost")]
        found += [self.noise_sentence(), self.replication_sentence(), self.resolution_sentence()]
        return [s for s in found if s] + [self.recommendation(priority)]

    def to_dict(self, priority: str) -> dict:
        out = {"priority": priority, "reference": self.reference, "sentences": self.sentences(priority)}
        for family in ("quality", "alignment", "cost"):
            found = self.best(family)
            if found:
                metric, best, ties = found
                out[f"best_{family}"] = {
                    "metric": metric.key,
                    "variant": best,
                    "levels": self.variants[best]["levels"],
                    "within_noise": ties,
                }
        out["within_noise_of_reference"] = self.noise_ties_with_reference()
        out["noise"] = self.noise_dict()
        return out

    def noise_dict(self) -> dict:
        """The noise model as data: training seeds, the rule, the smallest real differences, and the
        variants whose differences are unreplicated."""
        unrep = [n for n in self.variants if n != self.reference and self.unreplicated(n)]
        return {
            "train_seeds": self.train_seeds,
            "rule": {1: "sampling", 2: "two seeds"}.get(self.train_seeds, "t interval"),
            "smallest_real_difference": self.smallest(),
            "unreplicated": unrep,
        }


def _amount(metric: Metric, v: float) -> str:
    """A difference in the metric's units: percentage points for rates, else its own format."""
    if metric.fmt(0.5).endswith("%"):
        return f"{100 * v:.1f} points"
    return metric.fmt(v)


def _names(names: Sequence[str]) -> str:
    quoted = [f"`{n}`" for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
