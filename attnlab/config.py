"""The run config: one typed tree (data, model, diffusion, train, sample) loaded from YAML with
command-line overrides, validated once, and saved as JSON next to every checkpoint."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from attnlab.data.config import DataConfig
from attnlab.errors import ConfigError
from attnlab.models.config import ModelConfig


@dataclass
class DiffusionConfig:
    """The training objective and noise schedule.

    Attributes:
        prediction: what the model predicts: "epsilon" (Ho et al. 2020) or "v_prediction" (Salimans & Ho 2022).
        beta_schedule: "linear", "scaled_linear" or "squaredcos_cap_v2" (cosine).
        num_train_timesteps: length of the noise schedule.
        cond_drop: probability of replacing a training condition by the null one (for CFG).
        min_snr_gamma: min-SNR-gamma loss weighting (Hang et al. 2023); None = plain MSE.
    """

    prediction: Literal["epsilon", "v_prediction"] = "v_prediction"
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    cond_drop: float = 0.1
    min_snr_gamma: float | None = None

    def validate(self) -> None:
        _check(
            self.num_train_timesteps >= 2, "diffusion.num_train_timesteps", self.num_train_timesteps, ">= 2"
        )
        _check(0 <= self.cond_drop < 1, "diffusion.cond_drop", self.cond_drop, "a probability in [0, 1)")
        _check(
            self.min_snr_gamma is None or self.min_snr_gamma > 0,
            "diffusion.min_snr_gamma",
            self.min_snr_gamma,
            "a positive number or null",
        )


@dataclass
class TrainConfig:
    """The optimisation.

    Attributes:
        steps: optimiser steps in total (a resumed run continues up to this step).
        batch_size: images per step over all processes (split evenly between them).
        lr: AdamW peak learning rate, reached after `warmup` steps.
        lr_schedule: "constant" after warmup, or "cosine" decay to 10% at `steps`.
        weight_decay: AdamW weight decay.
        ema_decay: decay of the exponential moving average of the weights (0 disables it).
        grad_clip: max global gradient norm (0 disables clipping).
        log_every: steps per loss-log line.
        ckpt_every: steps per checkpoint (a multiple of log_every); the last step is always saved.
        keep_checkpoints: how many recent checkpoints to keep.
        seed: seeds the model init and every step's batch, timesteps and noise.
        threads: torch CPU threads per process (0 = torch's default).
        progress: show a progress bar.
    """

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    log_every: int = 50
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    threads: int = 0
    progress: bool = True

    def validate(self) -> None:
        for key in ("steps", "batch_size", "log_every", "ckpt_every", "keep_checkpoints"):
            _check(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "a positive integer")
        _check(self.lr > 0, "train.lr", self.lr, "a positive number")
        _check(self.warmup >= 0, "train.warmup", self.warmup, "a non-negative number of steps")
        _check(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "a decay in [0, 1)")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, ">= 0 (0 disables clipping)")
        _check(
            self.ckpt_every % self.log_every == 0,
            "train.ckpt_every",
            self.ckpt_every,
            f"a multiple of train.log_every ({self.log_every})",
        )


@dataclass
class SampleConfig:
    """Defaults for `attnlab sample` (each can be overridden on its command line)."""

    sampler: Literal["ddpm", "ddim", "dpm++"] = "ddim"
    steps: int = 50
    guidance: float = 3.0

    def validate(self) -> None:
        _check(self.steps >= 1, "sample.steps", self.steps, "a positive integer")


@dataclass
class RunConfig:
    """Everything that defines a training run; `config.json` in a model directory is one of these."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> None:
        for section in (self.data, self.model, self.diffusion, self.train, self.sample):
            if hasattr(section, "validate"):
                section.validate()

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples become lists, as in JSON

    @staticmethod
    def from_dict(d: dict[str, Any], source: str = "config") -> RunConfig:
        """The config saved by `to_dict` (as in a model directory's config.json); the data is not read."""
        return _build([OmegaConf.create(d)], source, fill_from_data=False)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Load a RunConfig from YAML and apply `key=value` overrides (e.g. `model.width=64`).

    Raises:
        ConfigError: naming the file or override, the key and what was expected.
    """
    layers = []
    if path is not None:
        layers.append(_read_yaml(Path(path)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.width=64)")
        layers.append(_dotlist(item))
    return _build(layers, str(path) if path is not None else "overrides")


def _read_yaml(path: Path):
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (data, model, ...), got {type(data).__name__}"
        )
    return OmegaConf.create(data)


def _dotlist(item: str):
    try:
        return OmegaConf.from_dotlist([item])
    except OmegaConfBaseException as e:
        raise ConfigError(f"override {item!r}: {_first_line(e)}") from None


def _build(layers, source: str, fill_from_data: bool = True) -> RunConfig:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), *layers)
        if fill_from_data:
            _fill_from_data(merged)
        cfg = OmegaConf.to_object(merged)
        cfg.validate()
    except ConfigKeyError as e:
        raise ConfigError(f"{source}: unknown key {e.full_key!r}{_known_keys(e.full_key)}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e.full_key}: {_first_line(e)}") from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def data_facts(data: DataConfig) -> dict[str, Any]:
    """The model fields the data decides: channels, size, dimensionality and number of classes.

    Procedural data is asked with a two-item replica, so this costs milliseconds.
    """
    from attnlab.data import build_dataset

    small = dataclasses.replace(data, num=min(data.num, 2), num_eval=min(data.num_eval, 2))
    ds = build_dataset(small, "train")
    x = ds[0]["x"]
    return {
        "in_channels": x.shape[0],
        "size": x.shape[-1],
        "dims": x.dim() - 1,
        "num_classes": ds.num_classes,
    }


def _fill_from_data(merged) -> None:
    """model.in_channels, size and dims follow the data; a class-conditioned model left at
    num_classes=0 gets the dataset's number of classes."""
    facts = data_facts(OmegaConf.to_object(merged.data))
    for key in ("in_channels", "size", "dims"):
        merged.model[key] = facts[key]
    if merged.model.cond == "class" and not merged.model.num_classes and facts["num_classes"]:
        merged.model.num_classes = facts["num_classes"]


def _known_keys(full_key: str | None) -> str:
    """'; known keys of model: ...' for the section of an unknown key."""
    parts = (full_key or "").split(".")
    node: Any = RunConfig
    for p in parts[:-1]:
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if p not in hints:
            return ""
        node = hints[p]
    if not dataclasses.is_dataclass(node):
        return ""
    where = ".".join(parts[:-1]) or "the config"
    return f"; known keys of {where}: {', '.join(f.name for f in dataclasses.fields(node))}"


def _first_line(e: OmegaConfBaseException) -> str:
    return (getattr(e, "msg", None) or str(e)).splitlines()[0]


def _check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: expected {expected}")
