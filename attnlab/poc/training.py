"""The training stage of a PoC: one run per distinct architecture, through the one trainer (which
resumes from its last checkpoint), with a budget in steps or in wall-clock minutes."""

from __future__ import annotations

import dataclasses
import time

import torch

from attnlab.config import RunConfig, SampleConfig
from attnlab.poc.config import PocConfig, VariantConfig
from attnlab.poc.stages import VariantDirs, done, fingerprint, mark
from attnlab.poc.variants import variant_model
from attnlab.train import train
from attnlab.train.batches import TrainingData
from attnlab.train.trainer import fit_to_data

# Train-config keys that change how a run is shown or checkpointed, not what it learns.
_PRESENTATION = ("progress", "threads", "log_every", "ckpt_every", "keep_checkpoints")


def run_config(
    cfg: PocConfig, owner: VariantConfig, data: TrainingData, num_classes, context_dim, steps: int
) -> RunConfig:
    """The run config a model owner trains with (model fields that are facts of the data filled in)."""
    rc = RunConfig(
        data=cfg.data,
        model=variant_model(cfg, owner),
        diffusion=cfg.diffusion,
        train=dataclasses.replace(cfg.train, steps=steps),
        sample=SampleConfig(cfg.sample.sampler, cfg.budget.sample_steps, cfg.sample.guidance),
    )
    return fit_to_data(rc, data, num_classes, context_dim)


def learning_fingerprint(rc: RunConfig) -> str:
    """What decides the trained weights: the run config without presentation keys."""
    d = rc.to_dict()
    for k in _PRESENTATION:
        d["train"].pop(k, None)
    return fingerprint("train", d)


def budget_steps(cfg: PocConfig, rc: RunConfig, data: TrainingData, dirs: VariantDirs) -> int:
    """Steps to train: `budget.train_steps`, or `train_minutes` turned into steps once and kept."""
    if cfg.budget.train_steps is not None:
        return cfg.budget.train_steps
    fp = fingerprint(
        "budget",
        cfg.budget.train_minutes,
        learning_fingerprint(dataclasses.replace(rc, train=dataclasses.replace(rc.train, steps=0))),
    )
    record = done(dirs.marker("budget"), fp)
    if record is None:
        sec = seconds_per_step(rc, data)
        steps = max(1, int(cfg.budget.train_minutes * 60 / sec))
        record = mark(
            dirs.marker("budget"),
            fp,
            {"seconds_per_step": sec, "steps": steps, "minutes": cfg.budget.train_minutes},
        )
    return int(record["steps"])


def seconds_per_step(rc: RunConfig, data: TrainingData, timed_steps: int = 3) -> float:
    """Wall seconds of one training step of this model and batch size (after one untimed step)."""
    from attnlab.diffusion import alphas_cumprod, diffusion_loss
    from attnlab.models import build_model

    torch.manual_seed(rc.train.seed)
    model = build_model(rc.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=rc.train.lr)
    ab = alphas_cumprod(rc.diffusion.num_train_timesteps, rc.diffusion.beta_schedule)
    g = torch.Generator().manual_seed(0)
    start = 0.0
    for i in range(timed_steps + 1):
        if i == 1:
            start = time.perf_counter()
        x0, cond = data.batch(torch.randint(0, len(data), (rc.train.batch_size,), generator=g))
        diffusion_loss(model, x0, cond, ab, prediction=rc.diffusion.prediction, generator=g).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / timed_steps


def train_stage(rc: RunConfig, dirs: VariantDirs, data: TrainingData) -> dict:
    """Train (or resume) the model of `rc` in `dirs.model`; skipped when already trained for `rc`."""
    from attnlab.evaluate import training_time

    fp = learning_fingerprint(rc)
    record = done(dirs.marker("trained"), fp)
    if record is not None:
        return {**record, "skipped": True}
    ckpt = train(rc, dirs.model, data=data)
    record = {
        "checkpoint": str(ckpt.relative_to(dirs.root)),
        "steps": rc.train.steps,
        **training_time(dirs.model),
    }
    return {**mark(dirs.marker("trained"), fp, record), "skipped": False}
