"""Cost of a model config before any training: parameters, FLOPs of one denoiser call, and peak
memory of one training step and one sampling step, on inputs shaped like the config's data.

The counting itself is `attnlab.evaluate.cost` (torch.utils.flop_counter for FLOPs; CUDA allocator
statistics or the CPU profiler's allocation events for memory); this module decides what is run:

    train step   forward, loss, backward and an AdamW step on a batch, measured after one unmeasured
                 step so the optimiser's moment buffers already exist (the steady state of training).
    sample step  one denoiser call without gradients on the batch the sampling loop sends: with a
                 condition, classifier-free guidance runs the null and the real condition together,
                 so the call sees twice the batch.

Inputs are noise and zero-valued conditions: costs depend on shapes, not values. Text conditions use
`text_tokens` tokens of `context_dim` features (the encoder's real lengths vary by prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor, nn

from attnlab.conditioning import Condition
from attnlab.evaluate.cost import count_parameters, denoiser_flops, peak_memory
from attnlab.models.config import ModelConfig


@dataclass
class Inputs:
    """One batch for a denoiser: clean data, timesteps and condition (None when unconditional)."""

    x: Tensor
    t: Tensor
    cond: Condition | None

    def to(self, device) -> Inputs:
        return Inputs(
            self.x.to(device), self.t.to(device), None if self.cond is None else self.cond.to(device)
        )


def example_inputs(cfg: ModelConfig, batch: int, text_tokens: int = 8, seed: int = 0) -> Inputs:
    """A batch shaped as the config's data and condition (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.sample_shape(batch), generator=g).clamp(-1, 1)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return Inputs(x, t, example_condition(cfg, batch, text_tokens))


def example_condition(cfg: ModelConfig, batch: int, text_tokens: int = 8) -> Condition | None:
    if cfg.cond == "class":
        return Condition(labels=torch.arange(batch) % max(cfg.num_classes, 1))
    if cfg.cond == "text":
        tokens = torch.zeros(batch, text_tokens, cfg.context_dim)
        return Condition(tokens=tokens, mask=torch.ones(batch, text_tokens, dtype=torch.bool))
    return None


def guided(cond: Condition | None) -> Condition | None:
    """The condition batch of a classifier-free-guided call: [null rows; real rows]."""
    return None if cond is None else Condition.cat([cond.null_like(), cond])


@lru_cache(maxsize=1)
def _alpha_bar() -> Tensor:
    from attnlab.diffusion import alphas_cumprod

    return alphas_cumprod(1000, "squaredcos_cap_v2")  # built once, not inside a measured step


def train_step(model: nn.Module, opt: torch.optim.Optimizer, inp: Inputs) -> float:
    """One optimiser step on the eps-prediction loss at the batch's timesteps."""
    from attnlab.diffusion import add_noise

    ab = _alpha_bar().to(inp.x.device)[inp.t]  # (B,)
    noise = torch.randn_like(inp.x)
    out = model(add_noise(inp.x, noise, ab), inp.t, inp.cond)
    loss = (out - noise).square().mean()  # the target's value does not change the cost
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def sample_step(model: nn.Module, inp: Inputs) -> Tensor:
    """One denoiser call as the sampling loop makes it (CFG doubles a conditioned batch)."""
    if inp.cond is None:
        return model(inp.x, inp.t, None)
    return model(torch.cat([inp.x, inp.x]), inp.t.repeat(2), guided(inp.cond))


def model_cost(
    model: nn.Module,
    cfg: ModelConfig,
    *,
    batch: int = 16,
    memory: bool = True,
    text_tokens: int = 8,
) -> dict:
    """The cost table of a denoiser built from `cfg`.

    Args:
        model: the denoiser (its weights are changed by the measured training step; pass a copy
            if they matter).
        cfg: its config (data shape and condition).
        batch: samples per training step and per sampling step.
        memory: measure the two peaks (each runs a step under the memory profiler on CPU).
        text_tokens: tokens per text condition.
    Returns:
        {"params", "flops_per_call" (one sample, one call), "gflops_per_call"} and, with memory,
        {"train_step_peak_bytes", "sample_step_peak_bytes"} for `batch` samples.
    """
    device = next(model.parameters()).device
    one = example_inputs(cfg, 1, text_tokens)
    flops = denoiser_flops(model, cfg.sample_shape(), one.cond)
    out = {"params": count_parameters(model), "flops_per_call": flops, "gflops_per_call": flops / 1e9}
    if memory:
        inp = example_inputs(cfg, batch, text_tokens).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()
        train_step(model, opt, inp)  # creates the optimiser state outside the measurement
        out["train_step_peak_bytes"] = peak_memory(lambda: train_step(model, opt, inp), device)
        model.eval()
        out["sample_step_peak_bytes"] = peak_memory(lambda: sample_step(model, inp), device)
    return out
