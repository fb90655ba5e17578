"""Variants of a PoC resolved against each other: which trained model each samples (its `base`, or the
first variant with the same architecture), its model config, its sampling-time techniques, its levels."""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnlab.errors import ConfigError
from attnlab.models.config import ModelConfig

if TYPE_CHECKING:
    from attnlab.poc.config import PocConfig, VariantConfig


def lineage(cfg: PocConfig, v: VariantConfig) -> list[VariantConfig]:
    """The variant, its base, its base's base, ... (the last one trains).

    Raises:
        ConfigError: the bases form a cycle.
    """
    chain = [v]
    while chain[-1].base is not None:
        nxt = cfg.variant(chain[-1].base)
        if nxt in chain:
            names = " -> ".join(x.name for x in [*chain, nxt])
            raise ConfigError(f"variants: the bases form a cycle ({names})")
        chain.append(nxt)
    return chain


def model_owner(cfg: PocConfig, v: VariantConfig) -> VariantConfig:
    """The variant whose trained model `v` samples: follows `base`, else the first variant with the same model."""
    mine = variant_model(cfg, v)
    return next(o for o in cfg.variants if o.base is None and variant_model(cfg, o) == mine)


def variant_model(cfg: PocConfig, v: VariantConfig, key: str = "") -> ModelConfig:
    """The model a variant is trained with: the base model, its `model` fields, its architectural techniques."""
    from attnlab.models.plan import resolve

    key = key or f"variant {v.name!r}"
    v = lineage(cfg, v)[-1]
    arch = {n: dict(o or {}) for n, o in v.techniques.items() if not _training_free(n)}
    fields = {**cfg.model.to_dict(), **v.model, "techniques": arch}
    try:
        model = ModelConfig.from_dict(fields)
        resolve(model)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    return model


def sampling_spec(cfg: PocConfig, v: VariantConfig) -> dict[str, dict]:
    """The training-free techniques a variant samples with: its own, after its base's."""
    spec: dict[str, dict] = {}
    for x in reversed(lineage(cfg, v)):
        spec.update({n: dict(o or {}) for n, o in x.techniques.items() if _training_free(n)})
    return spec


def own_levels(cfg: PocConfig, v: VariantConfig) -> list[int]:
    """The levels of what this variant adds over its reference: its own techniques, or its `level`."""
    levels = {technique(n).level for n in v.techniques}
    if v.level is not None:
        levels.add(v.level)
    return sorted(levels)


def _training_free(name: str) -> bool:
    return technique(name).training_free


def technique(name: str):
    """The registry entry `name` (every provider of techniques is imported first).

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    from attnlab.techniques import get

    return get(name)
