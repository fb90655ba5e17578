"""The votes' verdict in the PoC report: new votes (and undos) make the report stale, so the next
`attnlab poc` redraws it and nothing else; the Human preference section's numbers; the summary
names it only when the votes separate variants; `attnlab rate --report` redraws without a config."""

from __future__ import annotations

import json
import random

import pytest
from rate_util import NAMES, copy_poc, scripted_votes, shapes_poc

import attnlab.poc.sampling as poc_sampling
import attnlab.poc.training as poc_training
from attnlab.poc import load_poc_config, run_poc
from attnlab.rate import RatedPoc, Ratings
from attnlab.rate.schedule import Schedule
from attnlab.rate.store import Vote
from attnlab.rate.verdict import redraw_report

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def built(tmp_path_factory):
    return shapes_poc(tmp_path_factory.getbasetemp())


@pytest.fixture
def poc_dir(tmp_path, built):
    return copy_poc(built, tmp_path / "poc")


class Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.fn(*a, **k)


def _schedule_pairs(poc: RatedPoc, per_pair: int = 4) -> list:
    """The pairs one rater is shown, in the schedule's order (sides as shown). The sides are seeded so
    the scripted votes are the same every run: with equal strengths, a 95% interval still separates
    two variants about one run in twenty (seed 0 is such a run; seed 1 is not)."""
    schedule, votes = Schedule(poc, ("quality",), per_pair, rng=random.Random(1)), []  # sides: seeded
    while (ask := schedule.next(votes, "x")) is not None:
        it, p = ask.pair.item, ask.pair
        votes.append(
            Vote(
                len(votes),
                "x",
                "quality",
                it.prompt,
                it.index,
                it.seed,
                it.train_seed,
                p.left,
                p.right,
                "skip",
                "",
                "",
            )
        )
    return [v.pair for v in votes]


def _report_kept(lines: list[str]) -> bool:
    return any(" report: " in ln and "done before, kept" in ln for ln in lines)


def _stamps(out):
    return {p: p.stat().st_mtime_ns for p in (out / "variants").rglob("*") if p.is_file()}


def test_new_votes_make_the_next_poc_run_redraw_only_the_report(poc_dir, built, monkeypatch):
    cfg = load_poc_config(built.parent / "poc.yaml")
    train, sample = Counter(poc_training.train), Counter(poc_sampling.generate)
    monkeypatch.setattr(poc_training, "train", train)
    monkeypatch.setattr(poc_sampling, "generate", sample)

    def rerun() -> tuple[dict, list[str]]:
        lines = []
        return run_poc(cfg, poc_dir, progress=False, echo=lines.append), lines

    rerun()  # the copy's first run: the heat map's path moved with the folder
    stamps = _stamps(poc_dir)
    results, lines = rerun()
    assert "human_preference" not in results and _report_kept(lines)
    poc = RatedPoc(poc_dir)
    scripted_votes(
        Ratings.of(poc), _schedule_pairs(poc)[:6], {"base": 1.0, "attn16": 0.0, "pag": -1.0}, "ann"
    )
    results, lines = rerun()
    human = results["human_preference"]
    assert human["votes"] == 6 and human["raters"] == 1
    assert not _report_kept(lines)
    md = (poc_dir / "report.md").read_text()
    assert "## Human preference" in md and "A tie counts half a win to each side; a skip counts nothing" in md
    assert json.loads((poc_dir / "results.json").read_text())["human_preference"]["votes"] == 6
    results, lines = rerun()
    assert _report_kept(lines)  # no new vote: nothing redrawn
    Ratings.of(poc).undo("ann")
    results, _ = rerun()
    assert results["human_preference"]["votes"] == 5  # an undo makes it stale too
    assert train.calls == 0 and sample.calls == 0 and _stamps(poc_dir) == stamps  # nothing else redone


def test_the_section_holds_the_scores_win_rates_pairs_agreement_and_tau(poc_dir):
    poc = RatedPoc(poc_dir)
    pairs = _schedule_pairs(poc, per_pair=6)
    strengths = {"base": 0.0, "attn16": 0.0, "pag": 0.0}
    for i, rater in enumerate(("ann", "bob")):
        scripted_votes(Ratings.of(poc), pairs, strengths, rater, seed=i)
    results = redraw_report(poc_dir)
    q = results["human_preference"]["questions"]["quality"]
    assert q["votes"] == 36 and q["raters"] == 2
    assert sum(p["votes"] for p in q["pairs"]) == 36 and {p["votes"] for p in q["pairs"]} == {12}
    assert set(q["scores"]) == set(NAMES) and set(q["vs_reference"]) == {"attn16", "pag"}
    assert all(s["low"] <= s["score"] <= s["high"] for s in q["scores"].values())
    assert q["agreement"]["shared_items"] == 18 and q["agreement"]["alpha"] is not None
    assert set(q["kendall"]) == {"fid", "all_correct"}
    md = (poc_dir / "report.md").read_text()
    section = md.split("## Human preference")[1].split("\n## ")[0]
    assert (
        "Krippendorff's alpha" in section and "Kendall's tau" in section and "`base` vs `attn16`" in section
    )
    assert (
        "Human preference" not in md.split("## Summary")[1].split("\n## ")[0]
    )  # coin flips separate nothing
    assert "human-preference" in (poc_dir / "report.html").read_text()


def test_the_summary_names_the_votes_when_they_separate_variants(poc_dir):
    poc = RatedPoc(poc_dir)
    ratings = Ratings.of(poc)
    pairs = _schedule_pairs(poc, per_pair=8)
    for rater in ("ann", "bob", "cy"):
        for p in pairs:  # base always preferred; attn16 and pag even
            choice = "tie" if "base" not in (p.left, p.right) else "left" if p.left == "base" else "right"
            ratings.record(rater, "quality", p, choice)
    results = redraw_report(poc_dir)
    sentences = results["summary"]["sentences"]
    (said,) = [s for s in sentences if s.startswith("**Human preference**")]
    assert "`base` over `attn16` and `pag`" in said and sentences[-1].startswith("**Recommendation")
    q = results["human_preference"]["questions"]["quality"]
    assert sorted(map(tuple, q["separated"])) == [("base", "attn16"), ("base", "pag")]
    assert q["vs_reference"]["pag"]["rate"] == 0.0 and q["agreement"]["alpha"] == pytest.approx(1.0)
