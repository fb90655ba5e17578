"""The prompts every variant samples, and what each asks for (the request alignment scores against).

By default they are drawn from the eval split (captions for text models, labels for class models),
so the request comes from the item's ground truth; prompts given in the config are parsed instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attnlab.errors import AttnlabError, ConfigError
from attnlab.evaluate.prompts import PARSERS, parse_request, request_from_item


@dataclass
class PromptSet:
    """One sample's condition per position, the same for every variant and seed.

    Attributes:
        texts: prompts (text models) or None per sample.
        labels: class ids (class models) or None per sample.
        shown: how each sample's condition reads in the report.
        requests: what each asks for (for alignment), or None where it cannot be scored.
    """

    texts: list[str | None]
    labels: list[int | None]
    shown: list[str]
    requests: list[dict] | None

    def __len__(self) -> int:
        return len(self.shown)

    def to_dict(self) -> dict:
        return {"texts": self.texts, "labels": self.labels, "shown": self.shown, "requests": self.requests}


def poc_prompts(cfg, eval_ds) -> PromptSet:
    """The `budget.num_samples` conditions of a PoC (see the module docstring)."""
    n, cond, name = cfg.budget.num_samples, cfg.model.cond, cfg.data.name
    if cond == "none":
        return PromptSet([None] * n, [None] * n, ["(unconditional)"] * n, None)
    if cfg.prompts:
        given = [cfg.prompts[i % len(cfg.prompts)] for i in range(n)]
        return _named_classes(given, eval_ds, name) if cond == "class" else _given_texts(given, name)
    return drawn(cfg, eval_ds, draw(len(eval_ds), n, cfg.data.seed, 7))


def draw(size: int, n: int, *seed: int) -> list[int]:
    """`n` indices into a split of `size` items, the same for the same seed (with repeats if n > size)."""
    return np.random.default_rng([*seed]).choice(size, size=n, replace=n > size).tolist()


def drawn(cfg, ds, idx: list[int]) -> PromptSet:
    """The conditions of items `idx` of a split, with the requests their ground truth fulfils."""
    items, name, n = [ds[i] for i in idx], cfg.data.name, len(idx)
    if cfg.model.cond == "class":
        labels = [int(it["label"]) for it in items]
        shown = [ds.class_names[lab] if ds.class_names else str(lab) for lab in labels]
        return PromptSet([None] * n, labels, shown, _requests(lambda it: _class_request(name, it), items))
    texts = [it["text"] for it in items]
    return PromptSet(texts, [None] * n, texts, _requests(lambda it: request_from_item(name, it), items))


def _given_texts(texts: list[str], dataset: str) -> PromptSet:
    requests = None
    if dataset in PARSERS:
        try:
            requests = [parse_request(dataset, t) for t in texts]
        except ConfigError as e:
            raise ConfigError(f"prompts: {e}") from None
    return PromptSet(texts, [None] * len(texts), texts, requests)


def _named_classes(names: list[str], eval_ds, dataset: str) -> PromptSet:
    known = list(eval_ds.class_names or [])
    for n in names:
        if n not in known:
            raise ConfigError(f"prompts: {n!r} is not a class of {dataset}; classes: {', '.join(known)}")
    labels = [known.index(n) for n in names]
    return PromptSet(
        [None] * len(names),
        labels,
        list(names),
        [_named_request(dataset, n, lab) for n, lab in zip(names, labels)],
    )


def _named_request(dataset: str, name: str, label: int) -> dict:
    """What a class asks for, read from its name ("red circle", "sine C4") where the data has names."""
    if dataset == "shapes":
        return parse_request("shapes", f"a {name}")
    if dataset == "tones":
        waveform, note = name.split()
        return parse_request("tones", f"a {waveform} tone at {note}")
    return {"label": label}


def _class_request(dataset: str, item: dict) -> dict:
    """What a class label asks for: the first object or note of its item (a class names no more)."""
    if dataset == "shapes":
        first = {k: item["objects"][0][k] for k in ("shape", "color")}
        return {"objects": [first], "count": 1, "relation": None}
    if dataset == "tones":
        return {"notes": [{k: item["notes"][0][k] for k in ("waveform", "note", "pitch")}]}
    return {"label": int(item["label"])}


def _requests(make, items: list[dict]) -> list[dict] | None:
    try:
        return [make(it) for it in items]
    except (AttnlabError, KeyError):
        return None  # this data states no checkable request (e.g. an unlabelled folder)
