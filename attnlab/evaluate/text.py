"""Metrics of generated text: exact validity under the scenes grammar, condition agreement
(attributes asked versus attributes stated), diversity (distinct n-grams, Li et al. 2016,
arXiv:1510.03055; self-BLEU, Zhu et al. 2018, arXiv:1802.01886, with torchmetrics' BLEU), and the
generative perplexity under a small reference language model (`attnlab.evaluate.text_lm`)."""

from __future__ import annotations

from collections.abc import Sequence

from torchmetrics.functional.text import bleu_score

from attnlab.data.scenes import Scene, ScenesConfig, parse, words


def validity(texts: Sequence[str], well_formed: Sequence[bool], cfg: ScenesConfig) -> list[bool]:
    """Per text: well formed (content then padding only) and a sentence of the grammar."""
    return [ok and parse(t, cfg) is not None for t, ok in zip(texts, well_formed)]


def agreement(
    texts: Sequence[str], valid: Sequence[bool], asked: Sequence[Scene], cfg: ScenesConfig
) -> list[bool]:
    """Per text: valid, and the attributes it states are exactly the ones asked for."""
    return [v and parse(t, cfg) == a for t, v, a in zip(texts, valid, asked)]


def attribute_accuracy(
    texts: Sequence[str], valid: Sequence[bool], asked: Sequence[Scene], cfg: ScenesConfig
) -> float:
    """The share of asked condition tokens (n, layout, place, each object's size, colour, shape)
    that a valid text states in the same slot; an invalid text states none."""
    hit = total = 0
    for t, v, a in zip(texts, valid, asked):
        want = a.condition()
        got = parse(t, cfg).condition() if v else []
        total += len(want)
        hit += sum(w == g for w, g in zip(want, got)) if len(got) == len(want) else int(got[:1] == want[:1])
    return hit / max(1, total)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: distinct n-grams over all n-grams of the texts (0 when there are none)."""
    grams = [tuple(w[i : i + n]) for t in texts for w in [words(t)] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(texts: Sequence[str], n_gram: int = 4, limit: int = 200) -> float:
    """Self-BLEU: the mean BLEU-n of each text against all the others as references (higher: less
    diverse). The first `limit` texts are scored (the cost is quadratic)."""
    texts = [" ".join(words(t)) for t in texts[:limit]]
    if len(texts) < 2:
        return float("nan")
    scores = [
        float(bleu_score([t], [[*texts[:i], *texts[i + 1 :]]], n_gram=n_gram, smooth=True))
        for i, t in enumerate(texts)
    ]
    return sum(scores) / len(scores)


def diversity(texts: Sequence[str]) -> dict[str, float]:
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "distinct_3": distinct_n(texts, 3),
        "self_bleu_4": self_bleu(texts),
        "unique": len(set(texts)) / max(1, len(texts)),
    }
