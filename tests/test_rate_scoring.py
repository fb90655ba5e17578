"""Scores of votes, checked on synthetic votes with known answers: Bradley-Terry recovers the order
it was drawn from, a tie is half a win and a skip nothing, the bootstrap separates only what
differs, Krippendorff's alpha reads agreement, Kendall's tau reads a metric's direction."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy.stats import kendalltau

from attnlab.rate import scoring
from attnlab.rate.store import Vote

TRUE = {"a": 1.5, "b": 0.7, "c": 0.0, "d": -0.8, "e": -1.4}  # log-strengths the votes are drawn from


def vote(k: int, left: str, right: str, choice: str, rater: str = "r0", prompt: str = "p0") -> Vote:
    return Vote(k, rater, "quality", prompt, 0, 0, 0, left, right, choice, "", "")


def synthetic(
    n: int, strengths: dict[str, float], raters: int = 4, prompts: int = 12, seed: int = 0
) -> list[Vote]:
    """Votes of raters who follow Bradley-Terry `strengths`; 10% ties, 5% skips."""
    rng = random.Random(seed)
    names, out = list(strengths), []
    for k in range(n):
        a, b = rng.sample(names, 2)
        u = rng.random()
        p = 1 / (1 + math.exp(strengths[b] - strengths[a]))
        choice = "skip" if u < 0.05 else "tie" if u < 0.15 else "left" if rng.random() < p else "right"
        out.append(vote(k, a, b, choice, f"r{k % raters}", f"p{rng.randrange(prompts)}"))
    return out


def test_bradley_terry_recovers_the_known_order():
    names = list(TRUE)
    votes = synthetic(1500, TRUE)
    s = scoring.bradley_terry(scoring.wins_matrix(votes, names))
    assert list(np.argsort(-s)) == [0, 1, 2, 3, 4]
    assert abs(s.mean()) < 1e-9
    truth = np.array(list(TRUE.values()))
    assert np.abs((s - s.mean()) - (truth - truth.mean())).max() < 0.35  # ties pull scores in a little


def test_a_tie_is_half_a_win_to_each_side_and_a_skip_nothing():
    votes = [
        vote(0, "a", "b", "left"),
        vote(1, "b", "a", "tie"),
        vote(2, "a", "b", "skip"),
        vote(3, "a", "b", "right"),
    ]
    w = scoring.wins_matrix(votes, ["a", "b"])
    assert w[0, 1] == 1.5 and w[1, 0] == 1.5  # a: one win + half a tie; b: one win + half a tie
    assert scoring.record(votes, "a") == {"wins": 1, "ties": 1, "losses": 1, "rate": 0.5}
    s = scoring.bradley_terry(w)
    assert s[0] == pytest.approx(s[1])  # even
    assert scoring.bradley_terry(scoring.wins_matrix([votes[2]], ["a", "b"])).tolist() == [0.0, 0.0]


def test_the_bootstrap_separates_what_differs_and_nothing_else():
    names = list(TRUE)
    draws = scoring.bootstrap(synthetic(1500, TRUE), names, rounds=200)
    lo, hi = scoring.interval(draws)
    s = scoring.bradley_terry(scoring.wins_matrix(synthetic(1500, TRUE), names))
    assert (lo <= s).all() and (s <= hi).all()
    found = scoring.separated(draws, names)
    assert ("a", "e") in found and ("b", "d") in found  # far apart: separated, the better first
    even = {n: 0.0 for n in names}
    assert scoring.separated(scoring.bootstrap(synthetic(300, even, seed=3), names, rounds=200), names) == []


def test_the_bootstrap_resamples_raters_and_prompts():
    votes = synthetic(200, TRUE, raters=1, prompts=1)
    draws = scoring.bootstrap(votes, list(TRUE), rounds=20)
    assert np.allclose(draws, draws[0])  # one rater and one prompt: every resample is the same votes
    assert scoring.bootstrap(synthetic(200, TRUE, raters=3), list(TRUE), rounds=20).std(0).max() > 0


def test_krippendorff_alpha_reads_agreement():
    units = [("a", "b"), ("b", "c"), ("a", "c"), ("c", "d"), ("a", "d"), ("b", "d")]

    def votes_of(raters: dict[str, list[str]]) -> list[Vote]:
        out = []
        for r, choices in raters.items():
            for i, ((x, y), ch) in enumerate(zip(units, choices)):
                out.append(Vote(len(out), r, "quality", f"p{i}", i, 0, 0, x, y, ch, "", ""))
        return out

    same = ["left", "right", "tie", "left", "right", "left"]
    flipped = [{"left": "right", "right": "left"}.get(c, c) for c in same]
    assert scoring.agreement(votes_of({"ann": same, "bob": same}))["alpha"] == pytest.approx(1.0)
    assert scoring.agreement(votes_of({"ann": same, "bob": flipped}))["alpha"] < 0
    alone = scoring.agreement(votes_of({"ann": same}))
    assert alone["alpha"] is None and alone["raters"] == 1


def test_kendall_tau_against_a_metric_reads_its_direction():
    scores = {"a": 2.0, "b": 1.0, "c": 0.0}
    fid = {"a": 10.0, "b": 20.0, "c": 30.0}  # lower is better: the same order as the scores
    got = scoring.rank_agreement(scores, fid, lower_is_better=True)
    assert got["tau"] == pytest.approx(1.0) and got["n"] == 3
    acc = {"a": 0.2, "b": 0.5, "c": 0.9}  # higher is better: the opposite order
    assert scoring.rank_agreement(scores, acc, lower_is_better=False)["tau"] == pytest.approx(-1.0)
    assert scoring.rank_agreement(scores, {"a": 1.0, "b": 2.0}, True) is None  # two variants say nothing
    want = kendalltau([2.0, 1.0, 0.0], [-0.2, -0.9, -0.5])[0]
    assert scoring.rank_agreement(scores, {"a": 0.2, "b": 0.9, "c": 0.5}, True)["tau"] == pytest.approx(want)


def test_votes_per_pair():
    votes = [
        vote(0, "a", "b", "left"),
        vote(1, "b", "a", "left"),
        vote(2, "a", "b", "tie"),
        vote(3, "b", "a", "skip"),
    ]
    (ab,) = scoring.pair_counts(votes, ["a", "b"])
    assert ab == {"a": "a", "b": "b", "votes": 4, "a_wins": 1, "ties": 1, "b_wins": 1, "skips": 1}
