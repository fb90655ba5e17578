"""Noise schedules and samplers from `diffusers`: DDPM (Ho et al. 2020), DDIM (Song et al. 2021),
DPM-Solver++ (Lu et al. 2022)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from attnlab.errors import ConfigError

if TYPE_CHECKING:
    from attnlab.config import RunConfig

SAMPLERS = {
    "ddpm": "DDPM: ancestral sampling, stochastic, needs many steps (Ho et al. 2020)",
    "ddim": "DDIM: deterministic, good at 20-50 steps (Song et al. 2021)",
    "dpm++": "DPM-Solver++ 2M: deterministic multistep solver, good at 10-25 steps (Lu et al. 2022)",
}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction")


def make_scheduler(
    name: str = "ddim",
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    prediction_type: str = "epsilon",
    timestep_spacing: str = "trailing",
    clip_sample: bool = True,
) -> SchedulerMixin:
    """A diffusers scheduler for the sampler `name`, sharing the training noise schedule.

    Args:
        name: "ddpm", "ddim" or "dpm++".
        num_train_timesteps: length of the training noise schedule.
        beta_schedule: "linear" (DDPM's 1e-4..0.02), "scaled_linear" or "squaredcos_cap_v2" (cosine,
            Nichol & Dhariwal 2021).
        prediction_type: what the model predicts: "epsilon" or "v_prediction" (Salimans & Ho 2022).
        timestep_spacing: how sampling steps are spread; "trailing" starts at the last training step,
            which matters for few steps (Lin et al. 2024, Table 2).
        clip_sample: clip the predicted x0 to [-1, 1] (DDPM/DDIM; pixel-space data lives there).
    Returns:
        A fresh scheduler; `sample` calls its `set_timesteps`.
    """
    _check("sampler", name, SAMPLERS)
    _check("beta_schedule", beta_schedule, BETA_SCHEDULES)
    _check("prediction_type", prediction_type, PREDICTIONS)
    common = dict(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        timestep_spacing=timestep_spacing,
    )
    if name == "ddpm":
        return DDPMScheduler(clip_sample=clip_sample, **common)
    if name == "ddim":
        return DDIMScheduler(clip_sample=clip_sample, set_alpha_to_one=True, **common)
    return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common)


def scheduler_for(rc: RunConfig, sampler: str) -> SchedulerMixin:
    """`make_scheduler` for `sampler` on the noise schedule and prediction a run was trained with."""
    d = rc.diffusion
    return make_scheduler(sampler, d.num_train_timesteps, d.beta_schedule, d.prediction)


def alphas_cumprod(num_train_timesteps: int = 1000, beta_schedule: str = "linear") -> Tensor:
    """alpha_bar_t for t = 0..T-1 of the training schedule (the same one every sampler uses)."""
    _check("beta_schedule", beta_schedule, BETA_SCHEDULES)
    sched = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)
    return sched.alphas_cumprod.to(torch.float32)


def _check(key: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not supported; choose one of {', '.join(map(repr, allowed))}")
