"""The run config: one typed tree (data, model, diffusion, train, sample) loaded from YAML with
command-line overrides, validated once, and saved as JSON next to every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf

from attnlab.configio import build_structured, load_structured
from attnlab.data.config import DataConfig
from attnlab.errors import check
from attnlab.models.config import ModelConfig
from attnlab.precision import PRECISIONS, Precision


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
        check(
            self.num_train_timesteps >= 2, "diffusion.num_train_timesteps", self.num_train_timesteps, ">= 2"
        )
        check(0 <= self.cond_drop < 1, "diffusion.cond_drop", self.cond_drop, "a probability in [0, 1)")
        check(
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
        precision: "fp32", or "bf16" / "fp16" autocast over fp32 weights and optimizer state (fp16
            on CUDA only, with loss scaling); "auto" (the default) is bf16 where the CPU
            (avx512_bf16 or AMX) or GPU computes it natively, else fp32. config.json records the resolved value, and a
            resumed run keeps it.
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
    precision: Precision = "auto"

    def validate(self) -> None:
        check(self.precision in PRECISIONS, "train.precision", self.precision, " | ".join(PRECISIONS))
        for key in ("steps", "batch_size", "log_every", "ckpt_every", "keep_checkpoints"):
            check(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "a positive integer")
        check(self.lr > 0, "train.lr", self.lr, "a positive number")
        check(self.warmup >= 0, "train.warmup", self.warmup, "a non-negative number of steps")
        check(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "a decay in [0, 1)")
        check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, ">= 0 (0 disables clipping)")
        check(
            self.ckpt_every % self.log_every == 0,
            "train.ckpt_every",
            self.ckpt_every,
            f"a multiple of train.log_every ({self.log_every})",
        )


@dataclass
class SampleConfig:
    """Defaults for `attnlab sample` (each can be overridden on its command line); `precision` as
    in `TrainConfig` (controls that read attention probabilities compute them in fp32 either way)."""

    sampler: Literal["ddpm", "ddim", "dpm++"] = "ddim"
    steps: int = 50
    guidance: float = 3.0
    precision: Precision = "auto"

    def validate(self) -> None:
        check(self.precision in PRECISIONS, "sample.precision", self.precision, " | ".join(PRECISIONS))
        check(self.steps >= 1, "sample.steps", self.steps, "a positive integer")


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
        # a grid backbone would read the point order as positions: not equivariant to it
        check(
            self.data.name != "points" or self.model.backbone == "points",
            "model.backbone",
            self.model.backbone,
            "points for the points dataset (point clouds have no grid)",
        )

    def to_dict(self) -> dict[str, Any]:
        from attnlab.models.config import native_keys

        d = json.loads(json.dumps(dataclasses.asdict(self)))  # tuples become lists, as in JSON
        native_keys(d["model"])
        return d

    @staticmethod
    def from_dict(d: dict[str, Any], source: str = "config") -> RunConfig:
        """The config saved by `to_dict` (as in a model directory's config.json); the data is not read."""
        return build_structured(RunConfig, [OmegaConf.create(d)], source, fill_from_data=False)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Load a RunConfig from YAML and apply `key=value` overrides (e.g. `model.width=64`); the model
    fields the data decides (channels, size, dims, classes) are filled in from the data.

    Raises:
        ConfigError: naming the file or override, the key and what was expected.
    """
    return load_structured(RunConfig, path, overrides)
