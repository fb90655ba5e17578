"""The one sampling loop: a diffusers scheduler, classifier-free guidance (Ho & Salimans 2022) with
uncond and cond rows in one batch, guidance plug-ins, and the bus told the current step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn
from tqdm.auto import tqdm

from attnlab.attention import control, sample_seeds, sampling_step
from attnlab.conditioning import Condition
from attnlab.diffusion.guidance import Guidance
from attnlab.diffusion.objective import predict_x0


def noise_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, so a sample depends on its own seed and not on its batch."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def sample(
    model: nn.Module,
    shape: Sequence[int],
    cond: Condition | None = None,
    *,
    scheduler,
    steps: int,
    guidance: float | Callable[[int, int], float] = 1.0,
    generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
    guidances: Sequence[Guidance] = (),
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    x_T: Tensor | None = None,
) -> Tensor:
    """Draw samples from a denoiser.

    Args:
        model: denoiser `model(x, t, cond)` predicting the scheduler's `prediction_type`.
        shape: (B, C, *spatial) of the output.
        cond: (B,) conditions, or None for an unconditional model.
        scheduler: a diffusers scheduler (see `make_scheduler`); its `set_timesteps` is called here.
        steps: number of sampling steps.
        guidance: classifier-free guidance scale, or a function (i, steps) -> scale; at a step
            whose scale is 1 only the cond rows run (T-GATE drops CFG after its gate this way).
        generator: one generator for the whole batch (ignored when `seeds` is given).
        seeds: one seed per sample; the result for a seed does not depend on the batch around it.
            The bus holds them for the run, so controls that draw random numbers (token merging)
            draw each row's from its sample's seed (`AttnCall.seeds`).
        guidances: extra guidance terms (see `attnlab.diffusion.guidance.Guidance`); one that has
            `prepare(model, x, t, cond, ctx) -> x` may also replace the latent entering each step.
        callback: called once per step with {"i", "t", "x", "x0_pred"} (x entering step i and the
            clean sample it predicts).
        progress: show a progress bar.
        x_T: start from this noise instead of drawing it.
    Returns:
        (B, C, *spatial) samples (in the data range, [-1, 1] for attnlab datasets).
    """
    device = next(model.parameters()).device
    gens = noise_generators(seeds) if seeds is not None else generator
    if seeds is not None and len(seeds) != shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {shape[0]}")
    x = x_T.to(device) if x_T is not None else randn_tensor(tuple(shape), generator=gens, device=device)
    x = x * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=device)
    scale_at = guidance if callable(guidance) else (lambda i, n: guidance)
    extra = [c for g in guidances for c in g.controls()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), control(model, extra), sample_seeds(model, seeds):
            for i, t in enumerate(
                tqdm(scheduler.timesteps, disable=not progress, leave=False, desc="sample")
            ):
                tb = t.expand(x.shape[0])  # (B,)
                w = scale_at(i, steps)
                ctx = _context(scheduler, i, steps, tb, x, w)
                for g in guidances:
                    if hasattr(g, "prepare"):  # latent updates (Attend-and-Excite, local blend)
                        x = g.prepare(model, x, tb, cond, ctx)
                x_in = scheduler.scale_model_input(x, t)
                cfg = cond is not None and w != 1.0
                out = model_outputs(model, x_in, tb, cond, i, steps, cfg)
                guided = out["uncond"] + w * (out["cond"] - out["uncond"]) if cfg else out["cond"]
                for g in guidances:
                    if g.active(i, steps):
                        with sampling_step(model, i, steps, tb, roles=("cond",)):
                            guided = guided + g.correction(model, x_in, tb, cond, out, ctx)
                if callback is not None:
                    x0 = predict_x0(ctx["prediction_type"], x, guided, ctx["alpha_bar_t"].flatten())
                    callback({"i": i, "t": t, "x": x, "x0_pred": x0})
                x = scheduler.step(guided, t, x, generator=gens).prev_sample
    finally:
        model.train(was_training)
    return x


def model_outputs(model, x_in, tb, cond, i, steps, cfg) -> dict[str, Tensor]:
    """One model call; with CFG the batch is [uncond rows; cond rows] (Ho & Salimans 2022, Eq. 6)."""
    if not cfg:
        with sampling_step(model, i, steps, tb, roles=("cond",)):
            return {"cond": model(x_in, tb, cond)}
    both = Condition.cat([cond.null_like(), cond])
    with sampling_step(model, i, steps, tb.repeat(2), roles=("uncond", "cond")):
        uncond, cond_out = model(torch.cat([x_in, x_in]), tb.repeat(2), both).chunk(2)  # 2 x (B, ...)
    return {"uncond": uncond, "cond": cond_out}


def _context(scheduler, i, steps, tb, x, guidance) -> dict[str, Any]:
    ab = scheduler.alphas_cumprod.to(x.device)[tb.long()].to(x.dtype)
    return {
        "i": i,
        "steps": steps,
        "scheduler": scheduler,
        "alpha_bar_t": ab.view(-1, *[1] * (x.dim() - 1)),  # (B, 1, ..., 1)
        "prediction_type": scheduler.config.prediction_type,
        "guidance": guidance,
    }
