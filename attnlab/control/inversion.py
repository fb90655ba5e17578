"""Inversion of a real image into a model's noise under its caption, so that editing can start there.

Three methods, each on diffusers' DDIM schedulers (the sampler's noise schedule and prediction):
- "ddim": DDIM inversion (Song et al. 2021), the deterministic sampler run backwards with
  `DDIMInverseScheduler`, under the same guidance scale as the sampling that replays it. Exact only
  in the limit of small steps; at a guidance above 1 each step's error grows.
- "null-text": null-text inversion (Mokady et al., CVPR 2023, arXiv:2211.09794, Algorithm 1): a DDIM
  inversion at guidance 1 gives the pivot trajectory z*_t; then, step by step from z*_T, the
  unconditional embedding of that step is optimised so the guided DDIM step lands on z*_{t-1}.
- "ddpm": edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR 2024, arXiv:2304.06140,
  Eq. 5-6, as LEDITS++ uses): x_t drawn independently from q(x_t | x_0) at every sampler timestep,
  then the noise of each step extracted as z_t = (x_{t-1} - mu_t(x_t)) / sigma_t, so sampling with
  those noises (`NoiseMapScheduler`) reconstructs x_0 by construction.

The core functions see the model only through a `Denoiser` (the caption's conditional prediction,
the unconditional one under a given embedding), so attnlab models (`TextDenoiser` here) and
diffusers pipelines (`attnlab.integrations.diffusers.invert`) share them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from diffusers import DDIMInverseScheduler, DDIMScheduler
from torch import Tensor, nn

from attnlab.conditioning import Condition
from attnlab.errors import ConfigError

METHODS = {
    "ddim": "DDIM inversion (Song et al. 2021), replayed under the same guidance",
    "null-text": "null-text inversion (Mokady et al. 2023): a per-step unconditional embedding",
    "ddpm": "edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024): exact by construction",
}
PSNR_CAP = 100.0  # dB: identical images (mse 0) are reported at this value, so JSON stays finite


class Denoiser(Protocol):
    """The model as an inversion sees it, for one source caption.

    `cond(x, t)` predicts under the caption, `uncond(x, t, null)` under the unconditional embedding
    `null` (None: the model's own), `null()` is that own embedding (null-text's starting point),
    each in the scheduler's prediction type. `calls` counts model evaluations.
    """

    calls: int

    def cond(self, x: Tensor, t: Tensor) -> Tensor: ...

    def uncond(self, x: Tensor, t: Tensor, null: Tensor | None = None) -> Tensor: ...

    def null(self) -> Tensor: ...


def guided(den: Denoiser, x: Tensor, t: Tensor, w: float, null: Tensor | None = None) -> Tensor:
    """Classifier-free guidance, u + w (c - u) (Ho & Salimans 2022, Eq. 6); the cond pass alone at w = 1."""
    c = den.cond(x, t)
    if w == 1.0:
        return c
    u = den.uncond(x, t, null)
    return u + w * (c - u)


@dataclass(eq=False)
class Inversion:
    """A real image's inversion: what sampling needs to retrace it.

    Attributes:
        method: "ddim", "null-text" or "ddpm".
        x_T: (1, C, *S) the noise sampling starts from.
        steps, guidance: the sampler's step count and guidance scale the inversion is made for.
        config: the DDIM scheduler config (noise schedule, prediction, spacing) of the inversion.
        noise: ddpm only: (steps, C, *S) the noise term sigma_t z_t each sampling step adds.
        nulls: null-text only: (steps, *embedding) the unconditional embedding of each step.
        seconds: wall time of the inversion; model_calls: denoiser evaluations it made (a pass
            with gradients counts once).
        info: method details (null-text: inner iterations per step, final losses).
    """

    method: str
    x_T: Tensor
    steps: int
    guidance: float
    config: dict
    noise: Tensor | None = None
    nulls: Tensor | None = None
    seconds: float = 0.0
    model_calls: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def scheduler(self) -> DDIMScheduler:
        """The scheduler that retraces this inversion (`sample`'s or a pipeline's)."""
        if self.noise is None:
            return DDIMScheduler.from_config(self.config)
        sch = NoiseMapScheduler.from_config(self.config)
        sch.set_timesteps(self.steps)
        sch.noise_maps = {int(t): n for t, n in zip(sch.timesteps, self.noise)}
        return sch

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "steps": self.steps,
            "guidance": self.guidance,
            "seconds": round(self.seconds, 3),
            "model_calls": self.model_calls,
            **self.info,
        }


def inversion_config(scheduler) -> dict:
    """`scheduler`'s config (noise schedule, prediction, spacing) with x0 clipping off: clipping
    the predicted x0 to the data range cannot be undone, so an inversion and the sampling that
    retraces it run without it (null-text on the 16 px shapes model, 25 steps: 16-36 dB with, 37-38
    without, where its DDIM pivot holds)."""
    return {**dict(scheduler.config), "clip_sample": False}


def ddim_of(scheduler) -> DDIMScheduler:
    """A DDIM scheduler on `scheduler`'s noise schedule and prediction (any diffusers scheduler)."""
    return DDIMScheduler.from_config(inversion_config(scheduler))


class NoiseMapScheduler(DDIMScheduler):
    """DDIM at eta = 1, i.e. the DDPM posterior on the sampler's timesteps, whose noise at each step
    is a stored term (`noise_maps[t]` = sigma_t z_t) instead of a draw: the edit-friendly sampler
    x_{t-1} = mu_t(x_t) + sigma_t z_t (Huberman-Spiegelglas et al. 2024, Eq. 3). A timestep with no
    map adds nothing."""

    noise_maps: dict[int, Tensor] = {}

    def step(
        self,
        model_output: Tensor,
        timestep,
        sample: Tensor,
        eta: float = 1.0,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ):
        mean = posterior_mean(self, model_output, timestep, sample)
        n = self.noise_maps.get(int(timestep))
        prev = mean if n is None else mean + n.to(mean)
        if not return_dict:
            return (prev,)
        from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=None)


def posterior_mean(sch: DDIMScheduler, out: Tensor, t, x: Tensor) -> Tensor:
    """mu_t(x_t): diffusers' DDIM step at eta = 1 with zero noise (the DDPM posterior mean)."""
    zero = torch.zeros_like(x)
    return DDIMScheduler.step(sch, out, t, x, eta=1.0, variance_noise=zero).prev_sample


# The three inversions


def ddim_invert(den: Denoiser, x0: Tensor, scheduler, steps: int, guidance: float = 1.0) -> list[Tensor]:
    """The DDIM inversion trajectory [x_0, x_{t_1}, ..., x_{t_T}] under guidance `guidance`
    (`DDIMInverseScheduler`: each step evaluates the model at the next, noisier timestep)."""
    inv = DDIMInverseScheduler.from_config(inversion_config(scheduler))
    inv.set_timesteps(steps, device=x0.device)
    xs = [x0]
    with torch.no_grad():
        for t in inv.timesteps:
            tb = t.expand(x0.shape[0])  # (B,)
            xs.append(inv.step(guided(den, xs[-1], tb, guidance), t, xs[-1]).prev_sample)
    return xs


def invert_ddim(den: Denoiser, x0: Tensor, scheduler, steps: int, guidance: float) -> Inversion:
    start, calls = time.perf_counter(), den.calls
    xs = ddim_invert(den, x0, scheduler, steps, guidance)
    return Inversion(
        "ddim", xs[-1], steps, guidance, inversion_config(scheduler), seconds=time.perf_counter() - start,
        model_calls=den.calls - calls,
    )  # fmt: skip


def invert_null_text(
    den: Denoiser,
    x0: Tensor,
    scheduler,
    steps: int,
    guidance: float,
    inner_steps: int = 10,
    lr: float = 1e-2,
    tol: float = 1e-5,
) -> Inversion:
    """Null-text inversion (Mokady et al. 2023, Algorithm 1, with its code's settings): the pivot is
    the DDIM inversion at guidance 1; at step i the embedding starts from step i - 1's, Adam at
    lr * (1 - i / (2 * steps)) (the code's 1e-2 * (1 - i / 100) over 50 steps), at most
    `inner_steps` iterations, stopping once the loss is below tol + 2e-5 * i."""
    start, calls = time.perf_counter(), den.calls
    pivots = ddim_invert(den, x0, scheduler, steps, 1.0)[::-1]  # x_T first, x_0 last
    sch = ddim_of(scheduler)
    sch.set_timesteps(steps, device=x0.device)
    null = den.null().detach().clone()
    x, nulls, losses, iters = pivots[0], [], [], []
    for i, t in enumerate(sch.timesteps):
        tb, target = t.expand(x.shape[0]), pivots[i + 1]
        with torch.no_grad():
            c = den.cond(x, tb)
        null = null.detach().clone().requires_grad_(True)  # Adam updates in place: keep step i - 1's
        opt = torch.optim.Adam([null], lr=lr * (1 - i / (2 * steps)))
        n_iter = 0
        while n_iter < inner_steps:
            n_iter += 1
            with torch.enable_grad():
                u = den.uncond(x, tb, null)
                loss = F.mse_loss(sch.step(u + guidance * (c - u), t, x).prev_sample, target)
                opt.zero_grad()
                loss.backward()
            opt.step()
            if loss.item() < tol + 2e-5 * i:
                break
        null = null.detach()
        with torch.no_grad():
            u = den.uncond(x, tb, null)
            x = sch.step(u + guidance * (c - u), t, x).prev_sample
            losses.append(F.mse_loss(x, target).item())
        nulls.append(null)
        iters.append(n_iter)
    info = {"inner_steps": inner_steps, "lr": lr, "iterations": sum(iters), "last_step_mse": losses[-1]}
    return Inversion(
        "null-text", pivots[0], steps, guidance, inversion_config(scheduler), nulls=torch.stack(nulls),
        seconds=time.perf_counter() - start, model_calls=den.calls - calls, info=info,
    )  # fmt: skip


def invert_ddpm(
    den: Denoiser,
    x0: Tensor,
    scheduler,
    steps: int,
    guidance: float,
    generator: torch.Generator | None = None,
) -> Inversion:
    """Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024): x_t = sqrt(alpha_bar_t) x_0 +
    sqrt(1 - alpha_bar_t) eps_t with independent eps_t (Eq. 5), then at each sampling step the noise
    term x_{t-1} - mu_t(x_t) = sigma_t z_t (Eq. 6; kept as the product, so a last step with
    sigma = 0 still lands on x_0), under the guided prediction sampling will use."""
    start, calls = time.perf_counter(), den.calls
    sch = ddim_of(scheduler)
    sch.set_timesteps(steps, device=x0.device)
    ab = sch.alphas_cumprod.to(x0)
    eps = torch.randn((len(sch.timesteps), *x0.shape), generator=generator).to(x0)
    xs = [ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * e for t, e in zip(sch.timesteps, eps)] + [x0]
    noise = []
    with torch.no_grad():
        for i, t in enumerate(sch.timesteps):
            out = guided(den, xs[i], t.expand(x0.shape[0]), guidance)
            noise.append((xs[i + 1] - posterior_mean(sch, out, t, xs[i]))[0])
    return Inversion(
        "ddpm", xs[0], steps, guidance, inversion_config(scheduler), noise=torch.stack(noise),
        seconds=time.perf_counter() - start, model_calls=den.calls - calls,
    )  # fmt: skip


def invert(
    den: Denoiser,
    x0: Tensor,
    method: str,
    *,
    scheduler,
    steps: int,
    guidance: float,
    seed: int = 0,
    inner_steps: int = 10,
) -> Inversion:
    """Invert `x0` (1, C, *S) with `method` ("ddim", "null-text" or "ddpm") for a sampler of `steps`
    steps at guidance `guidance` on `scheduler`'s noise schedule; `seed` draws ddpm's x_t."""
    if method not in METHODS:
        raise ConfigError(f"--inversion {method!r} is not supported; choose one of {', '.join(METHODS)}")
    if method == "ddim":
        return invert_ddim(den, x0, scheduler, steps, guidance)
    if method == "null-text":
        return invert_null_text(den, x0, scheduler, steps, guidance, inner_steps)
    return invert_ddpm(den, x0, scheduler, steps, guidance, torch.Generator().manual_seed(int(seed)))


def psnr(a: Tensor, b: Tensor, mask: Tensor | None = None) -> float:
    """PSNR in dB of images in [-1, 1] (peak 1 on the [0, 1] scale), over `mask` (broadcast to the
    images, 1 = counted) when given; capped at PSNR_CAP."""
    d = ((a.float() - b.float()) / 2) ** 2
    if mask is not None:
        m = mask.float().expand_as(d)
        mse = (d * m).sum() / m.sum().clamp(min=1)
    else:
        mse = d.mean()
    return min(PSNR_CAP, -10 * math.log10(max(mse.item(), 10 ** (-PSNR_CAP / 10))))


# attnlab text models


NULL_TOKENS = ("one", "all")
NULL_JITTER = 1e-3  # "all": the copies' spread, so their gradients differ (identical tokens stay identical)


class TextDenoiser:
    """An attnlab text model under one caption's condition. Its unconditional embedding is the null
    condition: one real token (an all-zero token the model's projection turns into a learned
    "empty" token) and masked padding (`Condition.null_like`).

    What null-text inversion optimises (`null_tokens`):
    - "one": that real token, (1, 1, D). Cross-attention to a single key reads the same value at
      every position, so this embedding can only shift each cross-attention output by a constant.
    - "all": a token at every one of the caption's L positions, all attended, (1, L, D), as the
      paper optimises every position of Stable Diffusion's 77-token null embedding. They start as
      copies of the zero token, jittered by 1e-3 (seeded), so the start predicts as the model's own
      null condition to float precision, while positions can then pull apart and make the
      correction vary across the image.
    """

    def __init__(self, model: nn.Module, cond: Condition, null_tokens: str = "all"):
        if null_tokens not in NULL_TOKENS:
            raise ConfigError(f"null_tokens {null_tokens!r}: expected one of {', '.join(NULL_TOKENS)}")
        self.model, self.cond_, self.null_tokens = model, cond, null_tokens
        self.calls = 0

    def cond(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.model(x, t, self.cond_)

    def uncond(self, x: Tensor, t: Tensor, null: Tensor | None = None) -> Tensor:
        self.calls += 1
        return self.model(x, t, with_null(self.cond_.null_like(), null))

    def null(self) -> Tensor:
        tokens = self.cond_.null_like().tokens[:1]  # (1, L, D), all zero
        if self.null_tokens == "one":
            return tokens[:, :1]
        g = torch.Generator().manual_seed(0)
        return tokens + NULL_JITTER * torch.randn(tokens.shape, generator=g).to(tokens)


def with_null(null_cond: Condition, null: Tensor | None) -> Condition:
    """The null condition with its first n tokens set to `null` (1, n, D) and attended (None: left
    as it is); n = 1 is the null condition's own real token, the rest stay masked padding."""
    if null is None:
        return null_cond
    n = null.shape[1]
    if n > null_cond.tokens.shape[1]:
        raise ValueError(f"a null embedding of {n} tokens for a condition of {null_cond.tokens.shape[1]}")
    tokens = torch.cat([null.expand(len(null_cond), n, -1), null_cond.tokens[:, n:]], 1)  # (B, L, D)
    mask = null_cond.mask.clone()
    mask[:, :n] = True
    return null_cond.replace(tokens=tokens, mask=mask)


@dataclass
class StepNullCondition(Condition):
    """A text condition whose unconditional counterpart is null-text's embedding of the current
    sampling step (`nulls[step]`, set by `NullSchedule` before each step's model call)."""

    nulls: Tensor | None = None
    step: int = 0

    def null_like(self) -> Condition:
        base = super().null_like()
        return base if self.nulls is None else with_null(base, self.nulls[self.step].to(base.tokens))


class StepHook:
    """A `sample(guidances=...)` plug-in that adds no guidance term and only acts on the step
    (`prepare`, before each model call); subclasses override what they need."""

    def controls(self) -> list:
        return []

    def active(self, i: int, steps: int) -> bool:
        return False

    def correction(self, model, x_in, t, cond, out, ctx) -> Tensor:
        return torch.zeros_like(x_in)

    def prepare(self, model, x: Tensor, t: Tensor, cond, ctx: dict) -> Tensor:
        return x


@dataclass(eq=False)
class NullSchedule(StepHook):
    """Tells a `StepNullCondition` the step about to run."""

    cond: StepNullCondition

    def prepare(self, model, x: Tensor, t: Tensor, cond, ctx: dict) -> Tensor:
        self.cond.step = ctx["i"]
        return x


def replay(
    model: nn.Module,
    cond: Condition,
    inv: Inversion,
    guidances: Sequence = (),
) -> Tensor:
    """Sample every row of `cond` from the inversion's noise with attnlab's sampling loop (its
    scheduler, per-step noise maps or unconditional embeddings); row 0 retraces the inversion when
    it holds the source caption. `guidances` (Prompt-to-Prompt, a mask blend) act as in `sample`,
    their `after_step` applied after the last step too.

    Returns:
        (len(cond), C, *S).
    """
    from attnlab.diffusion import sample

    rows = len(cond)
    if inv.nulls is not None:
        cond = StepNullCondition(cond.labels, cond.tokens, cond.mask, cond.inpaint, nulls=inv.nulls)
    plugins = [*guidances, *([NullSchedule(cond)] if inv.nulls is not None else [])]
    x_T = inv.x_T.expand(rows, *inv.x_T.shape[1:]).contiguous()
    x = sample(
        model, tuple(x_T.shape), cond, scheduler=inv.scheduler(), steps=inv.steps, guidance=inv.guidance,
        guidances=plugins, x_T=x_T,
    )  # fmt: skip
    for g in guidances:
        if hasattr(g, "after_step"):
            x = g.after_step(x, inv.steps - 1, inv.steps)
    return x
