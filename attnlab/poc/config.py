"""The proof-of-concept config: a dataset, a base model, variants named by registry technique, a budget,
the sampling seeds and prompts, and the priority the recommendation serves."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import MISSING

from attnlab.config import DiffusionConfig, TrainConfig
from attnlab.configio import load_structured
from attnlab.data.config import DataConfig
from attnlab.errors import AttnlabError, ConfigError
from attnlab.errors import check as _check
from attnlab.models.config import ModelConfig
from attnlab.poc.variants import lineage, technique, variant_model
from attnlab.precision import PRECISIONS, Precision
from attnlab.techniques.registry import EXPLICIT_MODALITIES, fits, modality_names, refusal_note

SEED_STRIDE = 100_000  # sample k of sampling seed s draws its noise from seed s * SEED_STRIDE + k

METRICS = ("fid", "kid", "alignment", "cost", "localisation")
DEFAULT_METRICS = ("fid", "kid", "alignment", "cost")  # localisation: text models on shapes or points only
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclass
class VariantConfig:
    """One design under test.

    Attributes:
        name: a short name (letters, digits, `_.+-`); also its directory under `variants/`.
        techniques: registry name -> options (None or {} for the defaults). Architectural ones
            (training_free=False) change the model and need training; training-free ones act at
            sampling time on the trained model.
        base: another variant whose trained model this one samples (it then adds training-free
            techniques only). Without `base`, variants with the same architecture share one model.
        model: model config fields this variant changes (e.g. attn_resolutions); needs training.
        level: the level (1-5) a `model`-only variant belongs to (techniques carry their own).
        note: one line shown in the report.
    """

    name: str = MISSING
    techniques: dict[str, Any] = field(default_factory=dict)
    base: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    level: int | None = None
    note: str = ""


@dataclass
class BudgetConfig:
    """How much work each variant gets.

    Attributes:
        train_steps: optimiser steps per trained model; or
        train_minutes: wall-clock minutes per trained model, turned into steps by timing a few
            steps first (the resolved count is kept, so a rerun trains to the same step).
        sample_steps: sampling steps per sample.
        num_samples: samples per sampling seed (one per prompt; FID/KID use them all).
        batch_size: samples per sampling-loop call (results do not depend on it).
        train_processes: models trained at once, each in its own process: 0 = on a CPU-only
            machine, every model that needs training at once (up to twice the cores), each process
            single-threaded (small models train faster so than with threads); 1 = one after another.
    """

    train_steps: int | None = None
    train_minutes: float | None = None
    sample_steps: int = 20
    num_samples: int = 64
    batch_size: int = 64
    train_processes: int = 0


@dataclass
class SamplingConfig:
    """The sampler every variant uses (its steps are `budget.sample_steps`) and the precision it
    computes in (`attnlab.config.SampleConfig.precision`)."""

    sampler: Literal["ddpm", "ddim", "dpm++"] = "ddim"
    guidance: float = 3.0
    ema: bool = True
    precision: Precision = "auto"


@dataclass
class PocConfig:
    """A proof of concept: which designs to compare, on what data, at what budget.

    Attributes:
        title: the report's title (default: from the dataset and model).
        data, model, diffusion, train: the base run (model without techniques; `train.steps`
            comes from `budget`).
        sample: sampler and guidance scale.
        budget: training and sampling budget per variant.
        variants: the designs; the first is the reference unless `reference` names another.
        metrics: any of fid, kid, alignment, cost (the default: all four) and localisation (heat-map
            IoU of shape words with their objects; text models on shapes).
        seeds: sampling seeds (at least 3): every metric is reported as mean and std over them.
        train_seeds: training seeds (default: `train.seed` alone): every trained model is trained
            once per seed, and training-free variants apply to each seed's model. With 3 or more,
            a difference is real when its t interval over the training seeds excludes 0; with 2, when
            both seeds agree in sign and each beats twice its sampling standard error; with 1,
            architectural differences are unreplicated and never recommended.
        prompts: the prompts every variant samples (text: captions; class: class names);
            default: `budget.num_samples` items drawn from the eval split.
        priority: what the recommendation optimises: quality, control (condition alignment) or speed.
        evaluator: the evaluator for FID/KID and alignment: a built-in name or a saved evaluator
            directory (default: the dataset's built-in).
        reference: the variant others are compared with (default: the first).
        heatmaps: draw heat maps on the reference model for one prompt when no variant has them.
        excite_words: words Attend-and-Excite strengthens (default: the dataset's object words).
        threads: torch CPU threads (0 = all cores).
    """

    title: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SamplingConfig = field(default_factory=SamplingConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    variants: list[VariantConfig] = field(default_factory=list)
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    train_seeds: list[int] | None = None
    prompts: list[str] | None = None
    priority: Literal["quality", "control", "speed"] = "quality"
    evaluator: str | None = None
    reference: str | None = None
    heatmaps: bool = True
    excite_words: list[str] | None = None
    threads: int = 0

    def to_dict(self) -> dict[str, Any]:
        import json

        from attnlab.models.config import native_keys

        d = json.loads(json.dumps(dataclasses.asdict(self), default=str))
        native_keys(d["model"])
        return d

    @property
    def training_seeds(self) -> list[int]:
        """The training seeds every trained model is trained with."""
        return list(self.train_seeds) if self.train_seeds is not None else [self.train.seed]

    @property
    def replicated(self) -> bool:
        """Whether each trained model is trained from more than one seed."""
        return len(self.training_seeds) > 1

    @property
    def reference_name(self) -> str:
        return self.reference or self.variants[0].name

    def variant(self, name: str) -> VariantConfig:
        return next(v for v in self.variants if v.name == name)

    def validate(self) -> None:
        """Raise ConfigError naming the first key whose value is not allowed."""
        validate(self)  # the module's function (Validation, below)


# Loading

# Keys a run config has but a PoC takes from elsewhere, and where they go instead.
_MISPLACED = {
    "train.steps": "not a PoC key: set the training budget with budget.train_steps or budget.train_minutes",
    "model.techniques": "not a PoC key: name techniques per variant (variants[i].techniques)",
    "sample.steps": "not a PoC key: set sampling steps with budget.sample_steps",
}


def load_poc_config(path: str | Path | None = None, overrides: list[str] = ()) -> PocConfig:
    """Load a PocConfig from YAML with `key=value` overrides (e.g. `budget.train_steps=200`); the model
    fields the data decides are filled in from the data, as for a run config.

    Raises:
        ConfigError: naming the file or override, the key and what was expected.
    """
    return load_structured(PocConfig, path, overrides, refused=_MISPLACED)


# Validation


def validate(cfg: PocConfig) -> None:
    """Raise ConfigError naming the first key whose value is not allowed."""
    cfg.diffusion.validate()  # the sections a run config also has, checked as a run config checks them
    cfg.train.validate()
    _check(
        cfg.sample.precision in PRECISIONS, "sample.precision", cfg.sample.precision, " | ".join(PRECISIONS)
    )
    _validate_lists(cfg)
    names = check_variant_names(cfg.variants)
    for i, v in enumerate(cfg.variants):
        key = f"variants[{i}]"
        _check(
            v.base is None or v.base in names, f"{key}.base", v.base, f"another variant ({', '.join(names)})"
        )
    for v in cfg.variants:
        lineage(cfg, v)  # a cycle of bases is an error
    for i, v in enumerate(cfg.variants):
        _validate_variant(cfg, v, f"variants[{i}]")
    _check(
        cfg.reference is None or cfg.reference in names,
        "reference",
        cfg.reference,
        f"one of the variants ({', '.join(names)})",
    )


def check_variant_names(variants: list[VariantConfig]) -> list[str]:
    """The variants' names; raise ConfigError naming the first that is not a directory name or
    repeats another."""
    names = [v.name for v in variants]
    for i, v in enumerate(variants):
        key = f"variants[{i}].name"
        _check(bool(_NAME.fullmatch(v.name)), key, v.name, "letters, digits and _ . + - (a directory name)")
        _check(v.name not in names[:i], key, v.name, "a name no other variant has")
    return names


def _validate_lists(cfg: PocConfig) -> None:
    _check(bool(cfg.variants), "variants", cfg.variants, "at least one variant (each: name, techniques)")
    _check(len(set(cfg.seeds)) >= 3, "seeds", cfg.seeds, "at least 3 distinct sampling seeds")
    _check(len(set(cfg.seeds)) == len(cfg.seeds), "seeds", cfg.seeds, "sampling seeds without repeats")
    if cfg.train_seeds is not None:
        _check(
            bool(cfg.train_seeds),
            "train_seeds",
            cfg.train_seeds,
            "at least one training seed (or leave it out to train with train.seed)",
        )
        _check(
            len(set(cfg.train_seeds)) == len(cfg.train_seeds),
            "train_seeds",
            cfg.train_seeds,
            "training seeds without repeats (a repeat trains the same model twice)",
        )
        _check(all(s >= 0 for s in cfg.train_seeds), "train_seeds", cfg.train_seeds, "non-negative integers")
    unknown = [m for m in cfg.metrics if m not in METRICS]
    _check(
        bool(cfg.metrics) and not unknown,
        "metrics",
        cfg.metrics,
        f"a non-empty subset of {', '.join(METRICS)}",
    )
    if "localisation" in cfg.metrics:
        _check(
            cfg.data.name in ("shapes", "points") and cfg.model.cond == "text",
            "metrics",
            cfg.metrics,
            "'localisation' (heat-map IoU of words with object masks) only for text models on shapes or points",
        )
    if "alignment" in cfg.metrics:
        _check(
            cfg.model.cond != "none",
            "metrics",
            cfg.metrics,
            "no 'alignment' for an unconditional model (model.cond=none)",
        )
    b = cfg.budget
    _check(
        (b.train_steps is None) != (b.train_minutes is None),
        "budget.train_steps",
        b.train_steps,
        "exactly one of budget.train_steps and budget.train_minutes",
    )
    _check(
        b.train_steps is None or b.train_steps >= 1, "budget.train_steps", b.train_steps, "a positive integer"
    )
    _check(
        b.train_minutes is None or b.train_minutes > 0,
        "budget.train_minutes",
        b.train_minutes,
        "a positive number",
    )
    _check(b.sample_steps >= 1, "budget.sample_steps", b.sample_steps, "a positive integer")
    _check(b.num_samples >= 2, "budget.num_samples", b.num_samples, "at least 2 (FID/KID compare sets)")
    _check(
        b.num_samples <= SEED_STRIDE, "budget.num_samples", b.num_samples, f"at most {SEED_STRIDE} per seed"
    )
    _check(b.batch_size >= 1, "budget.batch_size", b.batch_size, "a positive integer")
    _check(
        b.train_processes >= 0,
        "budget.train_processes",
        b.train_processes,
        ">= 0 (0 = automatic, 1 = one at a time)",
    )
    if cfg.prompts is not None:
        _check(cfg.model.cond != "none", "prompts", cfg.prompts, "no prompts for an unconditional model")
        _check(
            bool(cfg.prompts), "prompts", cfg.prompts, "a non-empty list, or null to draw from the eval split"
        )


def _validate_variant(cfg: PocConfig, v: VariantConfig, key: str) -> None:
    _check(v.base != v.name, f"{key}.base", v.base, "another variant, not the variant itself")
    _check(v.level is None or 1 <= v.level <= 5, f"{key}.level", v.level, "1 to 5")
    for name, opts in v.techniques.items():
        try:
            tech = technique(name)
        except KeyError as e:
            raise ConfigError(f"{key}.techniques.{name}: {e.args[0]}") from None
        _check(
            opts is None or isinstance(opts, dict),
            f"{key}.techniques.{name}",
            opts,
            "a mapping of options or null",
        )
        _check_technique(cfg, v, tech, dict(opts or {}), f"{key}.techniques.{name}")
    _check(
        "techniques" not in v.model,
        f"{key}.model.techniques",
        v.model.get("techniques"),
        f"techniques under {key}.techniques",
    )
    if v.base is not None:
        _check(
            not v.model,
            f"{key}.model",
            v.model,
            "nothing: a variant with a base samples its base's trained model",
        )
    variant_model(cfg, v, key)  # model overrides and architectural techniques must build


def _check_technique(cfg: PocConfig, v: VariantConfig, tech, opts: dict, key: str) -> None:
    root = lineage(cfg, v)[-1]  # the variant whose model this one samples
    backbone = root.model.get("backbone", cfg.model.backbone)
    hosted = backbone == "diffusers" and tech.training_free  # the diffusers host runs it
    _check(
        hosted or fits(tech, backbone),
        key,
        opts,
        f"a technique of the {backbone} backbone ({tech.name} works in {', '.join(tech.hosts)})"
        + refusal_note(tech, backbone),
    )
    modality = backbone if backbone in EXPLICIT_MODALITIES.values() else cfg.model.dims
    _check(
        modality in tech.modalities,
        key,
        opts,
        f"a technique for {modality_names((modality,))} data{refusal_note(tech, modality)}",
    )
    _check(tech.not_in_poc is None, key, opts, tech.not_in_poc or "")
    if not tech.training_free:
        _check(
            v.base is None,
            key,
            opts,
            "no architectural technique in a variant with a base (it samples the base's model): drop base to train it",
        )
        return
    if tech.needs_text:
        _check(
            cfg.model.cond == "text",
            key,
            opts,
            f"a text-conditioned model ({tech.name} reads cross-attention)",
        )
    try:
        tech.build(**opts)
    except (TypeError, ValueError, AttnlabError) as e:
        raise ConfigError(f"{key}: {e}") from None
