"""The votes' verdict in a PoC report: the "Human preference" section (Bradley-Terry scores with a
bootstrap interval over raters and prompts, win rates against the reference, votes per pair,
agreement between raters, Kendall's tau against the FID and alignment rankings), the summary's
sentence when the votes separate variants, the votes' digest that makes a report stale, and the
redraw behind `attnlab rate POC_DIR --report`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from attnlab.poc.document import Bullets, Cell, Heading, Para, Table
from attnlab.rate import scoring
from attnlab.rate.poc import QUESTIONS
from attnlab.rate.store import FILE, Ratings, Vote

ASKED = {"quality": "which sample is better", "alignment": "which sample shows its prompt better"}


def votes_digest(out: str | Path) -> str | None:
    """A hash of every vote in POC_DIR/ratings.sqlite (None without votes): the report's fingerprint
    holds it, so a new vote or an undo makes the next `attnlab poc` redraw the report."""
    path = Path(out) / FILE
    return Ratings(path, create=False).digest() if path.is_file() else None


def human_preference(out: str | Path, entries: Sequence[dict], reference: str) -> dict | None:
    """The verdict of the PoC's votes as data (results.json's "human_preference"); None without votes."""
    path = Path(out) / FILE
    ratings = Ratings(path, create=False) if path.is_file() else None
    votes = ratings.votes() if ratings is not None else []
    names = [e["name"] for e in entries]
    votes = [v for v in votes if v.left in names and v.right in names]
    if not votes:
        return None
    asked = {q: _question(q, [v for v in votes if v.question == q], entries, reference) for q in QUESTIONS}
    asked = {q: a for q, a in asked.items() if a is not None}
    return {
        "votes": len(votes),
        "raters": len({v.rater for v in votes}),
        "digest": ratings.digest(),
        "questions": asked,
        "sentence": _sentence(asked),
        "rules": {
            "tie": "half a win to each side",
            "skip": "counts nothing",
            "prior": scoring.PRIOR,
            "rounds": scoring.ROUNDS,
            "level": scoring.LEVEL,
        },  # fmt: skip
    }


def _question(q: str, votes: list[Vote], entries: Sequence[dict], reference: str) -> dict | None:
    if not votes:
        return None
    names = [e["name"] for e in entries]
    scores = scoring.bradley_terry(scoring.wins_matrix(votes, names))
    draws = scoring.bootstrap(votes, names)
    lo, hi = scoring.interval(draws)
    by_name = dict(zip(names, scores.tolist()))
    return {
        "votes": len(votes),
        "skips": sum(v.choice == "skip" for v in votes),
        "ties": sum(v.choice == "tie" for v in votes),
        "raters": len({v.rater for v in votes}),
        "prompts": len({v.prompt for v in votes}),
        "scores": {
            n: {"score": s, "low": float(a), "high": float(b), **scoring.record(votes, n)}
            for n, s, a, b in zip(names, scores.tolist(), lo, hi)
        },
        "vs_reference": {n: scoring.record(votes, n, reference) for n in names if n != reference},
        "pairs": scoring.pair_counts(votes, names),
        "separated": [list(p) for p in scoring.separated(draws, names) if _enough(votes, p)],
        "agreement": scoring.agreement(votes),
        "kendall": _kendall(by_name, entries),
    }


def _enough(votes: list[Vote], pair: tuple[str, str]) -> bool:
    """Whether both variants have the decided votes a separation needs (scoring.MIN_VOTES)."""
    decided = [scoring.record(votes, n) for n in pair]
    return all(r["wins"] + r["ties"] + r["losses"] >= scoring.MIN_VOTES for r in decided)


def _kendall(scores: dict[str, float], entries: Sequence[dict]) -> dict:
    """Kendall's tau of the human ranking against the quality and alignment headlines' rankings."""
    from attnlab.poc.metrics import ALL, headline

    keys = sorted({k for e in entries for k in e["metrics"]})
    out = {}
    for family in ("quality", "alignment"):
        m = headline(family, keys)
        if m is None:
            continue
        means = {e["name"]: e["metrics"][m.key]["mean"] for e in entries if m.key in e["metrics"]}
        found = scoring.rank_agreement(scores, means, ALL[m.key].lower_is_better)
        if found is not None:
            out[m.key] = {"label": m.label, **found}
    return out


def _sentence(asked: dict[str, dict]) -> str | None:
    """The summary's sentence: only when the votes separate variants beyond their interval."""
    parts = []
    for q, a in asked.items():
        if not a["separated"]:
            continue
        by_better: dict[str, list[str]] = {}
        for better, worse in a["separated"]:
            by_better.setdefault(better, []).append(worse)
        said = "; ".join(f"`{b}` over {_names(w)}" for b, w in by_better.items())
        parts.append(f"on {q}, raters preferred {said} ({a['votes']} votes, {_count(a['raters'], 'rater')})")
    if not parts:
        return None
    level = round(100 * scoring.LEVEL)
    return (
        f"**Human preference** (beyond the {level}% bootstrap interval of Bradley-Terry scores): "
        + "; ".join(parts)
        + "."
    )


# The section


def section(human: dict, reference: str) -> list:
    """The report's "Human preference" blocks."""
    level = round(100 * scoring.LEVEL)
    asked = human["questions"]
    blocks: list = [
        Heading("Human preference"),
        Para(
            f"Blind A/B votes from `attnlab rate`: {human['votes']} votes by {_count(human['raters'], 'rater')}, each on two "
            "variants' samples of the same prompt, sampling seed and training seed, shown side by side in random order "
            "with the names hidden. A tie counts half a win to each side; a skip counts nothing. Scores are "
            f"Bradley-Terry log-strengths (mean 0; a difference d means odds of e^d to 1) fitted by choix's ILSR "
            f"with a weak prior (alpha {scoring.PRIOR:g}), with {level}% intervals from {scoring.ROUNDS} bootstrap "
            "resamples of raters and prompts."
        ),
    ]
    for q, a in asked.items():
        if len(asked) > 1:
            blocks.append(
                Heading(f"Asked {ASKED[q]}" + (" (alignment)" if q == "alignment" else " (quality)"), 3)
            )
        blocks += [_scores_table(a, reference), _pairs_table(a), Bullets(_notes(a))]
    return blocks


def _scores_table(a: dict, reference: str) -> Table:
    top = max(a["scores"].values(), key=lambda s: s["score"])["score"]
    rows = []
    for name, s in sorted(a["scores"].items(), key=lambda kv: -kv[1]["score"]):
        vs = a["vs_reference"].get(name)
        decided = vs and vs["wins"] + vs["ties"] + vs["losses"]
        rows.append([
            Cell(f"`{name}`" + (" (reference)" if name == reference else "")),
            Cell(f"{_signed(s['score'])} [{_signed(s['low'])}, {_signed(s['high'])}]", bold=s["score"] == top),
            Cell(f"{s['wins']} · {s['ties']} · {s['losses']}"),
            Cell("reference" if vs is None else f"{100 * vs['rate']:.0f}% of {decided}" if decided else "–"),
        ])  # fmt: skip
    header = ["variant", "Bradley-Terry score [interval]", "wins · ties · losses", "win rate vs reference"]
    caption = (
        "Bold: preferred most. Win rate vs reference: (wins + ties / 2) / votes, on the votes that put it "
        "beside the reference."
    )
    return Table(header, [("", rows)], caption=caption)


def _pairs_table(a: dict) -> Table:
    rows = [
        [Cell(f"`{p['a']}` vs `{p['b']}`"), Cell(str(p["votes"])), Cell(str(p["a_wins"])), Cell(str(p["ties"])),
         Cell(str(p["b_wins"])), Cell(str(p["skips"]))]
        for p in a["pairs"]
    ]  # fmt: skip
    return Table(["pair", "votes", "first preferred", "ties", "second preferred", "skips"], [("", rows)],
                 caption="Votes per pair of variants (the schedule asks every pair about equally often).")  # fmt: skip


def _notes(a: dict) -> list[str]:
    notes = []
    if a["separated"]:
        said = ", ".join(f"`{b}` over `{w}`" for b, w in a["separated"])
        notes.append(
            f"Separated beyond the interval (the bootstrap interval of the score difference excludes 0, both with "
            f"{scoring.MIN_VOTES} or more decided votes): {said}."
        )
    else:
        notes.append(
            "No two variants are separated: every interval of a score difference includes 0, or one side has fewer "
            f"than {scoring.MIN_VOTES} decided votes (a bootstrap of a handful of votes is too narrow to trust). "
            "More votes narrow the intervals."
        )
    ag = a["agreement"]
    if ag["raters"] < 2:
        notes.append(
            "Agreement between raters: one rater, nothing to compare (the bootstrap resamples prompts only)."
        )
    elif ag["alpha"] is None:
        notes.append(f"Agreement between raters: the {ag['raters']} raters judged no item in common.")
    else:
        notes.append(
            f"Agreement between raters: Krippendorff's alpha {ag['alpha']:.2f} (ordinal; 1 is perfect agreement, 0 "
            f"is chance) over {ag['shared_items']} items judged by two or more of the {ag['raters']} raters."
        )
    for k in a["kendall"].values():
        tau = "undefined (a ranking is all ties)" if k["tau"] is None else f"{k['tau']:+.2f}"
        p = "" if k["p"] is None else f", p = {k['p']:.2f}"
        notes.append(
            f"Kendall's tau of the human ranking against the {k['label']} ranking: {tau} ({k['n']} variants{p}; +1: the same order)."
        )
    if not a["kendall"]:
        notes.append(
            "Kendall's tau against the metric rankings needs three or more variants with those metrics."
        )
    return notes


def _signed(x: float) -> str:
    return f"{'+' if x >= 0 else '−'}{abs(x):.2f}" if math.isfinite(x) else "–"


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _names(names: Sequence[str]) -> str:
    quoted = [f"`{n}`" for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


# The redraw


def redraw_report(out: str | Path) -> dict:
    """Write the report of a finished PoC again from its results.json and poc.json (nothing is
    trained, sampled or evaluated), with the Human preference section of the votes there now.

    Raises:
        NotAFinishedPoc: the folder holds no finished PoC.
    """
    import json

    from omegaconf import OmegaConf

    from attnlab.configio import build_structured
    from attnlab.poc.config import PocConfig
    from attnlab.poc.pipeline import PipelinePocConfig
    from attnlab.poc.prompts import PromptSet
    from attnlab.poc.report import write_report
    from attnlab.poc.stages import seed_dirs
    from attnlab.rate.poc import NotAFinishedPoc, RatedPoc

    out = Path(out)
    results = RatedPoc(out).results
    try:
        data = json.loads((out / "poc.json").read_text())
    except (OSError, ValueError) as e:
        raise NotAFinishedPoc(f"{out / 'poc.json'}: the PoC's resolved config cannot be read ({e})") from None
    schema = PipelinePocConfig if "pipeline" in data else PocConfig
    cfg = build_structured(schema, [OmegaConf.create(data)], str(out / "poc.json"), fill_from_data=False)
    shown = results["prompts"]
    prompts = PromptSet([None] * len(shown), [None] * len(shown), shown, None)
    first = results["train_seeds"][0]
    heat = [
        {**h, "path": str(seed_dirs(out, h["variant"], results["train_seeds"], first).root / h["file"])}
        for h in results.get("heatmaps", [])
    ]
    wall = results.get("timing", {}).get("wall_seconds_this_run", 0.0)
    (out / "stages" / "report.json").unlink(missing_ok=True)  # asked for: redrawn even when not stale
    found = write_report(cfg, out, results["variants"], prompts, heat, results.get("real_data"), wall)
    found.pop("skipped", None)
    return found
