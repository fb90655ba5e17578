"""The technique registry: every attention design, registered once with its level, paper and config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

LEVELS = {
    1: "input: data and conditions into tokens",
    2: "internal: attention blocks inside the backbone",
    3: "time: how the timestep shapes attention",
    4: "cross-scale: attention between resolutions",
    5: "output: re-adjusting samples at sampling time",
}


@dataclass(frozen=True)
class Technique:
    """One registered attention design.

    Attributes:
        name: registry key, used in configs and on the command line.
        level: 1 to 5, see LEVELS.
        paper: the source paper (short citation with arXiv id where there is one).
        training_free: True if it acts on a trained model at sampling time.
        summary: one line on what it is for and what it costs.
        target: the class built from the config (a Control for training-free ones, a config
            dataclass for architectural ones).
        backbones: backbones it works in ("unet", "dit").
        modalities: data dimensionalities it works on (1 = audio, 2 = images).
    """

    name: str
    level: int
    paper: str
    training_free: bool
    summary: str
    target: Any
    backbones: tuple[str, ...] = ("unet", "dit")
    modalities: tuple[int, ...] = (1, 2)
    defaults: dict[str, Any] = field(default_factory=dict)

    def build(self, **overrides):
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise ValueError(
                f"technique {self.name!r} has no option(s) {sorted(unknown)}; options: {sorted(self.defaults)}"
            )
        return self.target(**{**self.defaults, **overrides})


REGISTRY: dict[str, Technique] = {}


def _defaults(cls) -> dict[str, Any]:
    if not dataclasses.is_dataclass(cls):
        return {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def register(name: str, *, level: int, paper: str, training_free: bool, summary: str, **kw):
    """Class decorator that registers a technique; the class's dataclass fields are its config."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level}")

    def deco(cls):
        if name in REGISTRY:
            raise ValueError(f"technique {name!r} is registered twice")
        REGISTRY[name] = Technique(
            name, level, paper, training_free, summary, cls, defaults=_defaults(cls), **kw
        )
        return cls

    return deco


def get(name: str) -> Technique:
    load_all()
    if name not in REGISTRY:
        raise KeyError(f"unknown technique {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def techniques(level: int | None = None) -> list[Technique]:
    load_all()
    return sorted((t for t in REGISTRY.values() if level in (None, t.level)), key=lambda t: (t.level, t.name))


def load_all() -> None:
    """Import the modules that register techniques (kept lazy so the registry has no import cycles)."""
    import importlib

    for mod in _PROVIDERS:
        importlib.import_module(mod)


# Modules whose import registers techniques: the architectural ones (levels 1-4) and the
# sampling-time controls (levels 1, 3, 5).
_PROVIDERS: list[str] = ["attnlab.models.techniques", "attnlab.control"]
