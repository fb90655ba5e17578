"""Scores of human votes: Bradley-Terry strengths (Bradley & Terry, 1952) fitted by choix's ILSR
(Maystre & Grossglauser, 2015), a bootstrap over raters and prompts, win rates, votes per pair,
agreement between raters (Krippendorff's alpha) and rank agreement with a metric (Kendall's tau).

A tie counts half a win to each side; a skip counts nothing.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence

import numpy as np

from attnlab.rate.store import Vote

PRIOR = 0.1  # choix's alpha: a weak prior, so a variant that never lost keeps a finite score
ROUNDS = 400  # bootstrap resamples
LEVEL = 0.95  # interval coverage
# Decided votes (wins, ties, losses) each of two variants needs before their intervals may separate
# them: a percentile bootstrap over a handful of votes is far narrower than the truth.
MIN_VOTES = 10


def wins_matrix(votes: Sequence[Vote], names: Sequence[str], weights: np.ndarray | None = None) -> np.ndarray:
    """W[i, j]: how often variant i was preferred to j (a tie: half to each; a skip: nothing), each
    vote counted `weights[k]` times (default once)."""
    rows, cols, amount, of = _entries(votes, names)
    w = np.zeros((len(names), len(names)))
    np.add.at(w, (rows, cols), amount if weights is None else amount * np.asarray(weights)[of])
    return w


def _entries(votes: Sequence[Vote], names: Sequence[str]) -> tuple[np.ndarray, ...]:
    """The wins matrix as entries: (row, column, amount, index of the vote each comes from)."""
    at = {n: i for i, n in enumerate(names)}
    rows, cols, amount, of = [], [], [], []
    for k, v in enumerate(votes):
        a, b = at[v.left], at[v.right]
        for r, c, x in {"left": [(a, b, 1.0)], "right": [(b, a, 1.0)], "tie": [(a, b, 0.5), (b, a, 0.5)]}.get(
            v.choice, []
        ):
            rows.append(r)
            cols.append(c)
            amount.append(x)
            of.append(k)
    return np.array(rows, int), np.array(cols, int), np.array(amount, float), np.array(of, int)


def bradley_terry(w: np.ndarray) -> np.ndarray:
    """Log-strengths of a wins matrix (mean 0): P(i preferred to j) = 1 / (1 + exp(s_j - s_i))."""
    import choix

    if not w.any():
        return np.zeros(len(w))
    s = choix.ilsr_pairwise_dense(w, alpha=PRIOR)
    return s - s.mean()


def bootstrap(votes: Sequence[Vote], names: Sequence[str], rounds: int = ROUNDS, seed: int = 0) -> np.ndarray:
    """(rounds, variants) Bradley-Terry scores of resampled votes: raters and prompts are each drawn
    with replacement, and a vote counts as often as its rater times its prompt was drawn."""
    rng = np.random.default_rng(seed)
    raters = sorted({v.rater for v in votes})
    prompts = sorted({v.prompt for v in votes})
    r_at = np.array([raters.index(v.rater) for v in votes])
    p_at = np.array([prompts.index(v.prompt) for v in votes])
    rows, cols, amount, of = _entries(votes, names)
    out = np.empty((rounds, len(names)))
    for i in range(rounds):
        r = np.bincount(rng.integers(len(raters), size=len(raters)), minlength=len(raters))
        p = np.bincount(rng.integers(len(prompts), size=len(prompts)), minlength=len(prompts))
        w = np.zeros((len(names), len(names)))
        np.add.at(w, (rows, cols), amount * (r[r_at] * p[p_at])[of])
        out[i] = bradley_terry(w)
    return out


def interval(draws: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval per column."""
    tail = 100 * (1 - level) / 2
    return np.percentile(draws, tail, axis=0), np.percentile(draws, 100 - tail, axis=0)


def separated(draws: np.ndarray, names: Sequence[str], level: float = LEVEL) -> list[tuple[str, str]]:
    """(better, worse) for every pair whose bootstrap interval of the score difference excludes 0."""
    out = []
    for i, j in itertools.combinations(range(len(names)), 2):
        lo, hi = interval(draws[:, [i]] - draws[:, [j]], level)
        if lo[0] > 0:
            out.append((names[i], names[j]))
        elif hi[0] < 0:
            out.append((names[j], names[i]))
    return out


def record(votes: Sequence[Vote], name: str, against: str | None = None) -> dict:
    """A variant's wins, ties and losses (against one other variant, or all); rate = (wins + ties/2) / decided."""
    wins = ties = losses = 0
    for v in votes:
        if name not in (v.left, v.right) or (against is not None and against not in (v.left, v.right)):
            continue
        if v.choice == "tie":
            ties += 1
        elif v.winner == name:
            wins += 1
        elif v.winner is not None:
            losses += 1
    n = wins + ties + losses
    return {"wins": wins, "ties": ties, "losses": losses, "rate": (wins + ties / 2) / n if n else None}


def pair_counts(votes: Sequence[Vote], names: Sequence[str]) -> list[dict]:
    """Per variant pair (in `names` order): votes, first's wins, ties, second's wins, skips."""
    out = []
    for a, b in itertools.combinations(names, 2):
        on = [v for v in votes if {v.left, v.right} == {a, b}]
        c = Counter("tie" if v.choice == "tie" else "skip" if v.choice == "skip" else v.winner for v in on)
        out.append(
            {
                "a": a,
                "b": b,
                "votes": len(on),
                "a_wins": c[a],
                "ties": c["tie"],
                "b_wins": c[b],
                "skips": c["skip"],
            }
        )
    return out


def agreement(votes: Sequence[Vote]) -> dict:
    """Krippendorff's alpha (ordinal: one side better, tie, the other better; skips missing) over the
    items and variant pairs that two or more raters judged."""
    raters = sorted({v.rater for v in votes})
    units: dict[tuple, dict[str, float]] = {}
    for v in votes:
        if v.choice == "skip":
            continue
        a, b = v.pair.variants
        value = 0.0 if v.choice == "tie" else 1.0 if v.winner == a else -1.0
        units.setdefault((v.question, a, b, v.pair.item), {})[v.rater] = value
    shared = {u: by for u, by in units.items() if len(by) >= 2}
    out = {"raters": len(raters), "shared_items": len(shared), "alpha": None}
    if len(raters) < 2 or not shared:
        return out
    data = np.full((len(raters), len(shared)), np.nan)
    for j, by in enumerate(shared.values()):
        for r, value in by.items():
            data[raters.index(r), j] = value
    if len(np.unique(data[~np.isnan(data)])) < 2:
        return {**out, "alpha": 1.0}  # every rater gave every shared item the same answer
    import krippendorff

    out["alpha"] = float(
        krippendorff.alpha(
            reliability_data=data, value_domain=[-1.0, 0.0, 1.0], level_of_measurement="ordinal"
        )
    )
    return out


def rank_agreement(scores: dict[str, float], metric: dict[str, float], lower_is_better: bool) -> dict | None:
    """Kendall's tau between the human ranking and a metric's (positive: they agree); None with fewer
    than three variants measured by both."""
    from scipy.stats import kendalltau

    names = [n for n in scores if n in metric]
    if len(names) < 3:
        return None
    sign = -1.0 if lower_is_better else 1.0
    tau, p = kendalltau([scores[n] for n in names], [sign * metric[n] for n in names])
    return {
        "tau": None if np.isnan(tau) else float(tau),
        "p": None if np.isnan(p) else float(p),
        "n": len(names),
    }
