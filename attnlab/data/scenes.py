"""`scenes`: procedural descriptions of `shapes` scenes from a small grammar, conditioned on the
scene's attributes, so that a generated description parses back and is checked exactly.

The grammar (words separated by spaces; a comma is a word of its own)::

    scene   := one | two | three
    one     := ["there is"] object place                   (1 object; place: where it is)
    two     := object relation object                      (2 objects; left of / above, and when
                                                            parsing also right of / below)
    three   := object "," object "and" object              (3 objects, left to right)
    object  := ("a" | "one") size colour shape
    place   := "at the top left" | "on the left" | "in the center" | ...   (`shapes.POSITIONS`)

A scene's attributes are its objects' (size, colour, shape) in canonical order (left to right, or
top to bottom), the layout ("horizontal" / "vertical" for two) and the place of a single object.
The parser reads "a large blue square right of a small red circle" as the same attributes as "a
small red circle left of a large blue square"; descriptions are drawn in canonical order only
("left of", "above"), since the swapped wording makes a sentence's object order depend on one
relation word, which a few CPU-minutes of masked diffusion did not learn to respect (13% of
two-object samples agreed with their condition at 1500 steps with it, against all single-object ones). The condition is those attributes as tokens ("n=2",
"layout=horizontal", "size=small", "color=red", "shape=circle", ...), from a fixed vocabulary.

Splits: train, eval and ref (the third split, which trains the reference language model of the
generative perplexity) never share a description: each description belongs to the split a hash of
its text picks (80 / 10 / 10 %), and each split draws scenes until it has its items.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field

import numpy as np

from attnlab.data.config import COLORS, SHAPES
from attnlab.data.shapes import POSITIONS
from attnlab.errors import check

TEXT_SPLITS = ("train", "eval", "ref")
SIZES = ("small", "large")
RELATIONS = {"left of": ("horizontal", False), "right of": ("horizontal", True)}
RELATIONS |= {"above": ("vertical", False), "below": ("vertical", True)}  # (layout, swapped)
PLACES = {phrase: name.replace(" ", "_") for name, phrase in POSITIONS}
_SHARES = (0.8, 0.1, 0.1)  # train, eval, ref by text hash
_STREAM = 3


@dataclass
class ScenesConfig:
    """The built-in text set.

    Attributes:
        num, num_eval, num_ref: items of the train, eval and ref splits.
        seed: seeds every split's draws.
        max_objects: objects per scene, 1 to 3.
        shapes, colors: the vocabularies (subsets of `shapes`' SHAPES, COLORS).
    """

    num: int = 4096
    num_eval: int = 512
    num_ref: int = 2048
    seed: int = 0
    max_objects: int = 2
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")

    def __post_init__(self):
        self.shapes, self.colors = tuple(self.shapes), tuple(self.colors)
        for key in ("num", "num_eval", "num_ref"):
            check(getattr(self, key) >= 1, f"data.{key}", getattr(self, key), "a positive number of items")
        check(1 <= self.max_objects <= 3, "data.max_objects", self.max_objects, "1 to 3")
        for key, allowed in (("shapes", SHAPES), ("colors", COLORS)):
            values = getattr(self, key)
            ok = bool(values) and set(values) <= set(allowed) and len(set(values)) == len(values)
            check(ok, f"data.{key}", list(values), f"distinct names among {', '.join(allowed)}")


# Attributes


@dataclass(frozen=True)
class Scene:
    """A scene's attributes: objects as (size, colour, shape) in canonical order, the layout of two
    objects ("horizontal", "vertical") and the place of one ("top_left", ...; "" otherwise)."""

    objects: tuple[tuple[str, str, str], ...]
    layout: str = ""
    place: str = ""

    def condition(self) -> list[str]:
        """The condition tokens, in slot order."""
        head = [f"n={len(self.objects)}"]
        head += [f"layout={self.layout}"] if self.layout else []
        head += [f"place={self.place}"] if self.place else []
        return head + [f"{k}={v}" for o in self.objects for k, v in zip(("size", "color", "shape"), o)]


def condition_vocab(cfg: ScenesConfig) -> list[str]:
    """Every condition token of the config, after the null token "[null]" (id 0)."""
    words = [f"n={n}" for n in range(1, cfg.max_objects + 1)]
    words += ["layout=horizontal", "layout=vertical"] + [f"place={p}" for p in PLACES.values()]
    words += [f"size={s}" for s in SIZES] + [f"color={c}" for c in cfg.colors]
    return ["[null]", *words, *(f"shape={s}" for s in cfg.shapes)]


def draw_scene(rng: np.random.Generator, cfg: ScenesConfig) -> Scene:
    """Uniform object count, then uniform attributes."""
    n = int(rng.integers(1, cfg.max_objects + 1))
    objs = tuple(
        (
            SIZES[rng.integers(2)],
            cfg.colors[rng.integers(len(cfg.colors))],
            cfg.shapes[rng.integers(len(cfg.shapes))],
        )
        for _ in range(n)
    )
    if n == 1:
        return Scene(objs, place=list(PLACES.values())[rng.integers(len(PLACES))])
    return Scene(objs, layout=("horizontal", "vertical")[rng.integers(2)] if n == 2 else "")


# The grammar: describe, parse


def _object(o: tuple[str, str, str], det: str) -> str:
    return f"{det} {o[0]} {o[1]} {o[2]}"


def describe(scene: Scene, rng: np.random.Generator) -> str:
    """One description of `scene`, its wording drawn from the grammar's choices."""
    det = lambda: ("a", "one")[rng.integers(2)]  # noqa: E731
    objs = scene.objects
    if len(objs) == 1:
        phrase = next(p for p, name in PLACES.items() if name == scene.place)
        lead = "there is " if rng.integers(2) else ""
        return f"{lead}{_object(objs[0], det())} {phrase}"
    if len(objs) == 2:
        rel = next(r for r, (lay, swapped) in RELATIONS.items() if lay == scene.layout and not swapped)
        return f"{_object(objs[0], det())} {rel} {_object(objs[1], det())}"
    a, b, c = (_object(o, det()) for o in objs)
    return f"{a} , {b} and {c}"


def words(text: str) -> list[str]:
    """The grammar's words: split on spaces, a comma a word of its own."""
    return re.sub(r",", " , ", text).split()


def parse(text: str, cfg: ScenesConfig) -> Scene | None:
    """The attributes a description states, or None if it is not a sentence of the grammar."""
    w = words(text)
    obj = lambda i: _parse_object(w[i : i + 4], cfg)  # noqa: E731
    if w[:2] == ["there", "is"]:
        w = w[2:]
        return _one(w, obj(0), cfg) if len(w) > 4 else None
    if len(w) >= 4 and obj(0) is not None:
        one = _one(w, obj(0), cfg)
        if one is not None:
            return one
    if len(w) == 14 and w[4] == "," and w[9] == "and" and cfg.max_objects >= 3:
        found = [obj(0), obj(5), obj(10)]
        return Scene(tuple(found)) if None not in found else None
    for rel, (layout, swapped) in RELATIONS.items():
        r = rel.split()
        if len(w) == 8 + len(r) and w[4 : 4 + len(r)] == r and cfg.max_objects >= 2:
            a, b = obj(0), obj(4 + len(r))
            if a is None or b is None:
                return None
            return Scene((b, a) if swapped else (a, b), layout=layout)
    return None


def _one(w: list[str], o, cfg: ScenesConfig) -> Scene | None:
    place = PLACES.get(" ".join(w[4:]))
    return Scene((o,), place=place) if place is not None and o is not None else None


def _parse_object(w: list[str], cfg: ScenesConfig) -> tuple[str, str, str] | None:
    if len(w) != 4 or w[0] not in ("a", "one"):
        return None
    size, color, shape = w[1:]
    ok = size in SIZES and color in cfg.colors and shape in cfg.shapes
    return (size, color, shape) if ok else None


def grammar_words(cfg: ScenesConfig) -> list[str]:
    """Every word a description may hold (the tokenizer's whole vocabulary)."""
    phrases = [*PLACES, *RELATIONS, "there is", "a one and ,", *SIZES, *cfg.colors, *cfg.shapes]
    return sorted(set(itertools.chain.from_iterable(p.split() for p in phrases)))


# Splits


def split_of(text: str) -> str:
    """The split a description belongs to, from a hash of its text (80 / 10 / 10 %)."""
    u = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64
    return TEXT_SPLITS[int(np.searchsorted(np.cumsum(_SHARES), u, side="right"))]


@dataclass
class TextSplit:
    """One split of a text set in memory.

    Attributes:
        texts: the descriptions.
        conditions: per item, its condition tokens (strings), in slot order ([] when unconditioned).
        scenes: per item, its attributes (the built-in set; None for user text).
    """

    texts: list[str]
    conditions: list[list[str]]
    scenes: list[Scene | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


def build_scenes(cfg: ScenesConfig, split: str) -> TextSplit:
    """The `split` of the scenes set: item i is the i-th draw of the split's stream that hashes to
    the split; the same for every run with this seed.

    Raises:
        ConfigError: a split name other than train, eval, ref.
    """
    check(split in TEXT_SPLITS, "split", split, f"one of {', '.join(TEXT_SPLITS)}")
    want = {"train": cfg.num, "eval": cfg.num_eval, "ref": cfg.num_ref}[split]
    rng = np.random.default_rng([_STREAM, cfg.seed, TEXT_SPLITS.index(split)])
    texts, scenes = [], []
    for _ in range(200 * want):  # the smallest split takes ~10 draws an item
        scene = draw_scene(rng, cfg)
        text = describe(scene, rng)
        if split_of(text) == split:
            texts.append(text)
            scenes.append(scene)
            if len(texts) == want:
                break
    return TextSplit(texts, [s.condition() for s in scenes], scenes)
