"""Published findings put to the test: claims from the literature, each checked by a PoC, judged from
the PoC's results.json under its own noise model (`attnlab.poc.metrics.difference`) and written as
one table (docs/findings.md) whose numbers are the reports' numbers.

A claims file (examples/findings/claims.yaml) lists each claim: what the paper says, where, the PoC
config that tests it, the metric, and per variant what the claim predicts against the reference:

    - id: tgate-keeps-fid
      claim: caching cross-attention after the gate step keeps FID
      source: T-GATE (Zhang et al. 2024), Table 1
      config: shapes32-unet.yaml
      metric: fid
      expect: {L3-tgate: same}
      tolerance: 0.10

`better` / `worse` hold when the difference is real (beyond the noise) in that direction; `same`
holds when the difference lies within `tolerance` (a share of the reference's value): with three
training seeds or more, when the whole 95% interval does. A claim about an architecture needs three
training seeds to be decided at all; with fewer its verdict is "inconclusive".
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from attnlab.errors import ConfigError, DataError
from attnlab.io import write_atomic
from attnlab.poc.metrics import ALL, Stat, difference

REPLICATED, NOT_REPLICATED, INCONCLUSIVE, NOT_RUN = "replicated", "not replicated", "inconclusive", "not run"
EXPECTATIONS = ("better", "worse", "same")
MIN_TRAIN_SEEDS = 3  # an architectural verdict needs a t interval over training seeds


@dataclass
class Claim:
    """One published claim and the PoC that tests it (see the module docstring)."""

    id: str
    claim: str
    source: str
    config: str  # the PoC config, relative to the claims file
    metric: str
    expect: dict[str, str]  # variant -> "better", "worse" or "same" than the reference
    overrides: list[str] = field(default_factory=list)  # key=value items for `attnlab poc`
    tolerance: float = 0.10
    architectural: bool = False
    setting: str = ""
    sweep: bool = False  # list every variant's value (a scale or layer sweep)
    why: str = ""  # what the reports showed, where the claim was not replicated


@dataclass
class ClaimsFile:
    claims: list[Claim] = field(default_factory=list)


def load_claims(path: str | Path) -> list[Claim]:
    """The claims of a claims file, validated.

    Raises:
        ConfigError: naming the file and key: a missing or unknown key, an unknown metric, a bad
            expectation, a tolerance outside (0, 1), a missing config file or duplicate ids.
    """
    path = Path(path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ClaimsFile), {"claims": OmegaConf.load(path)})
        claims: list[Claim] = [OmegaConf.to_object(c) for c in merged.claims]
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such claims file") from None
    except OmegaConfBaseException as e:
        raise ConfigError(
            f"{path}: {str(e).splitlines()[0]} (expected a list of claims: see attnlab.poc.findings)"
        ) from None
    seen = set()
    for i, c in enumerate(claims):
        where = f"{path}: claims[{i}] ({c.id})"
        if c.id in seen:
            raise ConfigError(f"{where}: id {c.id!r} is used twice")
        seen.add(c.id)
        if c.metric not in ALL:
            raise ConfigError(f"{where}.metric: {c.metric!r} is not a PoC metric; one of {', '.join(ALL)}")
        if not c.expect:
            raise ConfigError(f"{where}.expect: name at least one variant and what the claim predicts for it")
        for v, e in c.expect.items():
            if e not in EXPECTATIONS:
                raise ConfigError(f"{where}.expect.{v}: {e!r}; expected one of {', '.join(EXPECTATIONS)}")
        if not 0 < c.tolerance < 1:
            raise ConfigError(f"{where}.tolerance: {c.tolerance} is not a share of the reference in (0, 1)")
        if not (path.parent / c.config).is_file():
            raise ConfigError(f"{where}.config: {path.parent / c.config} does not exist")
    return claims


def run_name(claim: Claim) -> str:
    """The run folder name of a claim's PoC (claims that share a config and overrides share a run)."""
    stem = Path(claim.config).stem
    tail = "-".join(o.split("=", 1)[0].split(".")[-1] + "-" + o.split("=", 1)[1] for o in claim.overrides)
    return f"{stem}-{tail}" if tail else stem


def command(claim: Claim, claims_dir: Path, runs: Path) -> str:
    """The `attnlab poc` command that runs (or resumes) a claim's PoC."""
    parts = [
        "attnlab poc",
        str(claims_dir / claim.config),
        *claim.overrides,
        "--out",
        str(runs / run_name(claim)),
    ]
    return " ".join(parts)


# Judging


@dataclass
class Row:
    """One expectation of a claim against its PoC's results."""

    variant: str
    expect: str
    verdict: str
    reason: str
    reference: float | None = None
    value: float | None = None
    diff: float | None = None
    interval: tuple[float, float] | None = None
    rule: str | None = None
    train_seeds: int = 0


def judge(claim: Claim, results: dict | None) -> list[Row]:
    """Each expectation of `claim` judged from a PoC's results.json (None: not run yet)."""
    if results is None:
        return [Row(v, e, NOT_RUN, "the PoC has not been run") for v, e in claim.expect.items()]
    entries = {v["name"]: v for v in results["variants"]}
    ref_name = results["reference"]
    return [
        _row(claim, entries, ref_name, v, e, len(results.get("train_seeds") or [0]))
        for v, e in claim.expect.items()
    ]


def _row(claim: Claim, entries: dict, ref_name: str, variant: str, expect: str, n_train: int) -> Row:
    if variant not in entries:
        raise DataError(f"claim {claim.id}: the PoC has no variant {variant!r}; it has {', '.join(entries)}")
    ref, var = entries[ref_name]["metrics"].get(claim.metric), entries[variant]["metrics"].get(claim.metric)
    if ref is None or var is None:
        return Row(variant, expect, NOT_RUN, f"{claim.metric} was not measured", train_seeds=n_train)
    a, b = Stat.from_dict(var), Stat.from_dict(ref)
    d = difference(a, b)
    verdict, reason = _verdict(ALL[claim.metric], expect, d, b.mean, claim.tolerance)
    if claim.architectural and n_train < MIN_TRAIN_SEEDS and verdict != INCONCLUSIVE:
        verdict, reason = (
            INCONCLUSIVE,
            f"{reason}, but from {n_train} training seed(s); {MIN_TRAIN_SEEDS} decide an architecture",
        )
    return Row(variant, expect, verdict, reason, b.mean, a.mean, d.diff, d.interval, d.rule, n_train)


def _verdict(metric, expect: str, d, ref: float, tolerance: float) -> tuple[str, str]:
    """(verdict, reason) of one expectation from the difference `d` (variant minus reference)."""
    if expect == "same":
        return _same(d, tolerance * abs(ref))
    if not d.real:
        return INCONCLUSIVE, f"the difference is within the noise ({d.rule})"
    better = metric.better(d.diff, 0.0)
    holds = better if expect == "better" else not better
    said = "better" if better else "worse"
    return (REPLICATED if holds else NOT_REPLICATED), f"really {said} than the reference ({d.rule})"


def _same(d, tol: float) -> tuple[str, str]:
    if d.interval is not None:
        lo, hi = d.interval
        if -tol <= lo and hi <= tol:
            return REPLICATED, f"the 95% interval lies within ±{tol:.3g}"
        if lo > tol or hi < -tol:
            return NOT_REPLICATED, f"the 95% interval lies beyond ±{tol:.3g}"
        return INCONCLUSIVE, f"the 95% interval is wider than ±{tol:.3g}"
    if abs(d.diff) <= tol and not d.real:
        return REPLICATED, f"within ±{tol:.3g} and within the noise ({d.rule})"
    if abs(d.diff) > tol and d.real:
        return NOT_REPLICATED, f"a real change beyond ±{tol:.3g} ({d.rule})"
    return INCONCLUSIVE, f"the difference {d.diff:+.3g} against ±{tol:.3g} is not settled by {d.rule}"


def overall(rows: list[Row]) -> str:
    """A claim's verdict: replicated if every expectation holds, not replicated if any fails."""
    verdicts = {r.verdict for r in rows}
    if verdicts == {REPLICATED}:
        return REPLICATED
    if NOT_REPLICATED in verdicts:
        return "partly replicated" if REPLICATED in verdicts else NOT_REPLICATED
    if verdicts == {NOT_RUN}:
        return NOT_RUN
    return INCONCLUSIVE


# The document


def read_results(folder: Path) -> dict | None:
    """A run's results.json, or None when the PoC has not finished there."""
    path = folder / "results.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a PoC's results.json ({e}); rerun the PoC to rewrite it") from None


REPORT_FILES = ("report.md", "results.json")  # with figures/: what a published report carries


def publish_reports(claims: list[Claim], runs: Path, dest: Path) -> list[Path]:
    """Copy each finished PoC's report.md, results.json and figures into `dest`/<run name>/ (each
    file written whole), so the findings document links reports that live beside it."""
    made = []
    for name in dict.fromkeys(run_name(c) for c in claims):
        src = runs / name
        if read_results(src) is None:
            continue
        files = [src / f for f in REPORT_FILES] + sorted((src / "figures").glob("*.png"))
        for f in files:
            if f.is_file():
                target = dest / name / f.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                made.append(write_atomic(target, lambda tmp, f=f: shutil.copyfile(f, tmp)))
    return made


def findings_markdown(claims: list[Claim], claims_path: Path, runs: Path, reports: Path | None = None) -> str:
    """docs/findings.md: the summary table, then one section per claim with its rows and command;
    `reports` (relative to the document) links each claim's published report (see publish_reports)."""
    claims_dir = claims_path.parent
    judged = [(c, read_results(runs / run_name(c))) for c in claims]
    lines = [
        "# Published findings, reproduced (or not) on small data",
        "",
        f"Generated by `python scripts/findings.py report` from the PoC reports under `{runs}`; the",
        f"claims, their sources and what each predicts are in `{claims_path}`. A verdict follows the",
        "PoC's noise model: `better`/`worse` need a real difference (with 3+ training seeds, a 95% t",
        "interval over training seeds that excludes 0), `same` needs the difference within the claim's",
        "tolerance; an architectural claim from fewer than 3 training seeds stays inconclusive.",
        "",
        "| claim | source | metric | result (variant vs reference) | verdict |",
        "|---|---|---|---|---|",
    ]
    for c, res in judged:
        rows = judge(c, res)
        lines.append(
            f"| [{c.claim}](#{c.id}) | {c.source} | {ALL[c.metric].label} | {_results_cell(c, rows)} | **{overall(rows)}** |"
        )
    for c, res in judged:
        lines += ["", f"## {c.claim}", "", f'<a id="{c.id}"></a>', ""]
        lines += [f"- source: {c.source}", f"- setting: {c.setting or '(see the config)'}"]
        lines += [f"- command: `{command(c, claims_dir, runs)}`"]
        if res is not None:
            lines.append(
                f"- training seeds: {res.get('train_seeds') or [0]}, sampling seeds: {res.get('seeds')}"
            )
            if reports is not None:
                lines.append(f"- report: [{reports / run_name(c)}/report.md]({reports / run_name(c)}/report.md)")
        lines += [
            "",
            "| variant | predicted | reference | variant | difference | 95% interval | rule | verdict | why |",
        ]
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in judge(c, res):
            m = ALL[c.metric]
            cells = [r.variant, r.expect, _num(r.reference, m=m), _num(r.value, m=m), _num(r.diff, True, m)]
            cells += [_interval(r.interval, m), r.rule or "-", r.verdict, r.reason]
            lines.append("| " + " | ".join(cells) + " |")
        if c.sweep and res is not None:
            lines += ["", *_sweep(c, res)]
        if c.why:
            lines += ["", c.why.strip()]
    return "\n".join(lines) + "\n"


def _results_cell(c: Claim, rows: list[Row]) -> str:
    parts, m = [], ALL[c.metric]
    for r in rows:
        if r.value is None:
            parts.append(f"{r.variant}: -")
        else:
            iv = f" {_interval(r.interval, m)}" if r.interval else ""
            parts.append(f"{r.variant}: {_num(r.diff, True, m)}{iv}")
    return "; ".join(parts)


def _sweep(c: Claim, res: dict) -> list[str]:
    out = [
        f"Every variant's {ALL[c.metric].label} (mean ± sd over {'training' if len(res.get('train_seeds') or [0]) > 1 else 'sampling'} seeds):",
        "",
    ]
    out += ["| variant | " + ALL[c.metric].label + " |", "|---|---|"]
    for v in res["variants"]:
        s = v["metrics"].get(c.metric)
        value = "-" if s is None else f"{_num(s['mean'], m=ALL[c.metric])} ± {_num(s['std'], m=ALL[c.metric])}"
        out.append(f"| {v['name']} | {value} |")
    return out


def _num(v: float | None, sign: bool = False, m=None) -> str:
    """4 significant digits; a share (accuracy, coverage) in percent, a difference of shares in points."""
    if v is None or not math.isfinite(v):
        return "-"
    if m is not None and m.fmt(0.5).endswith("%"):
        return f"{100 * v:+.1f}%" if sign else f"{100 * v:.1f}%"
    return f"{v:+.4g}" if sign else f"{v:.4g}"


def _interval(iv, m=None) -> str:
    return "-" if iv is None else f"[{_num(iv[0], True, m)}, {_num(iv[1], True, m)}]"
