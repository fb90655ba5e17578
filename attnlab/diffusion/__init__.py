"""Diffusion: the training objective (eps / v prediction), diffusers schedulers, the one sampling loop."""

from attnlab.diffusion.guidance import Guidance
from attnlab.diffusion.objective import (
    add_noise,
    diffusion_loss,
    min_snr_weight,
    predict_eps,
    predict_x0,
    target,
)
from attnlab.diffusion.sampling import noise_generators, sample
from attnlab.diffusion.schedulers import SAMPLERS, alphas_cumprod, make_scheduler, scheduler_for

__all__ = [
    "SAMPLERS",
    "Guidance",
    "add_noise",
    "alphas_cumprod",
    "diffusion_loss",
    "make_scheduler",
    "min_snr_weight",
    "noise_generators",
    "predict_eps",
    "predict_x0",
    "sample",
    "scheduler_for",
    "target",
]
