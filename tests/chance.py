"""How high a blind guess scores, so that an accuracy threshold can be shown to be out of its reach."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def guess_accuracy(classes: int, truths: Sequence | None = None) -> float:
    """The expected accuracy of the better blind guess: uniform over `classes`, or always the
    commonest of `truths` (the scored units' true answers), which is never below the uniform one."""
    p = 1 / classes
    if truths:
        p = max(p, Counter(truths).most_common(1)[0][1] / len(truths))
    return p


def chance_ceiling(n: int, classes: int, truths: Sequence | None = None, sigmas: float = 5.0) -> float:
    """A blind guess's accuracy on `n` scored units plus `sigmas` of its binomial standard deviation,
    sqrt(p (1 - p) / n): a threshold above it is out of the guess's reach."""
    if truths is not None and len(truths) != n:
        raise ValueError(f"{len(truths)} truths for {n} scored units")
    p = guess_accuracy(classes, truths)
    return p + sigmas * math.sqrt(p * (1 - p) / n)
