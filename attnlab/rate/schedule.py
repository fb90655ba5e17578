"""Which pair a rater sees next: the variant pair with the fewest votes so far (over all raters), its
next item in an order every rater shares, sides drawn at random.

Each rater is asked `per_pair` items of every variant pair, so every pair is seen about equally
often; sharing the item order makes raters judge the same pairs, which is what their agreement is
measured on. With both questions, the alignment question follows the quality question on the same pair.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass

from attnlab.rate.poc import Item, Pair, RatedPoc
from attnlab.rate.store import Vote


@dataclass(frozen=True)
class Ask:
    """One question about one pair, as the page shows it."""

    pair: Pair
    question: str


class Schedule:
    """Args:
    poc: the rated PoC.
    questions: the questions every pair is asked, in order ("quality", "alignment" or both).
    per_pair: items of each variant pair one rater is asked (at most the PoC's items).
    rng: the source of sides and of the order among equally seen pairs.
    """

    def __init__(
        self, poc: RatedPoc, questions: tuple[str, ...], per_pair: int, rng: random.Random | None = None
    ):
        self.poc, self.questions = poc, tuple(questions)
        self.per_pair = max(1, min(per_pair, len(poc.items)))
        self.pairs = list(itertools.combinations(sorted(poc.variants), 2))
        self.order = {p: _shared_order(poc.items, p) for p in self.pairs}
        self.rng = rng or random.Random()

    @property
    def total(self) -> int:
        """Votes one rater is asked for."""
        return self.per_pair * len(self.pairs) * len(self.questions)

    def progress(self, mine: list[Vote]) -> dict:
        done = min(sum(v.question in self.questions for v in mine), self.total)
        return {"done": done, "total": self.total, "left": self.total - done}

    def next(self, everyone: list[Vote], rater: str) -> Ask | None:
        """What `rater` is asked next (None: they have answered everything asked of them)."""
        mine = [v for v in everyone if v.rater == rater.strip()]
        follow = self._follow_up(mine)
        if follow is not None:
            return follow
        first = self.questions[0]
        seen = Counter(v.pair.variants for v in everyone if v.question == first)
        done: dict[tuple[str, str], set[Item]] = {p: set() for p in self.pairs}
        for v in mine:
            if v.question == first and v.pair.variants in done:
                done[v.pair.variants].add(v.pair.item)
        open_pairs = [p for p in self.pairs if len(done[p]) < self.per_pair]
        if not open_pairs:
            return None
        fewest = min(seen[p] for p in open_pairs)
        a, b = self.rng.choice([p for p in open_pairs if seen[p] == fewest])
        item = next(it for it in self.order[a, b] if it not in done[a, b])
        left, right = (a, b) if self.rng.random() < 0.5 else (b, a)
        return Ask(Pair(item, left, right), first)

    def _follow_up(self, mine: list[Vote]) -> Ask | None:
        """The next question on the pair the rater answered last, if one is left."""
        if not mine or mine[-1].question not in self.questions:
            return None
        last = mine[-1]
        answered = {v.question for v in mine if v.pair == last.pair}
        rest = [q for q in self.questions[self.questions.index(last.question) + 1 :] if q not in answered]
        return Ask(last.pair, rest[0]) if rest else None


def _shared_order(items: list[Item], pair: tuple[str, str]) -> list[Item]:
    """The PoC's items in an order fixed by the pair's names: every rater meets them in this order."""
    order = list(items)
    random.Random("|".join(pair)).shuffle(order)
    return order
