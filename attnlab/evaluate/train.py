"""Training an evaluator: AdamW on the task's heads, with degradations that make it read imperfect
(generated) samples sensibly: blur, noise, colour/gain jitter and a low-resolution round trip.

The degradations keep every label true (no flips or crops: positions are labels), so the network
learns to see through them rather than to call a slightly soft square something else.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.evaluate.network import EvaluatorNet
from attnlab.evaluate.tasks.base import Task, total_loss


@dataclass
class TrainSettings:
    """Evaluator training budget and optimiser.

    Attributes:
        steps: optimiser steps.
        batch_size: samples per step.
        lr: peak learning rate (linear warm-up over 5 % of steps, then cosine decay).
        weight_decay: AdamW weight decay.
        augment: apply the degradations.
        seed: seeds initialisation, batch draws and degradations.
        log_every: steps between progress lines.
    """

    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    augment: bool = True
    seed: int = 0
    log_every: int = 200


@dataclass
class Group:
    """Training samples of one shape (one audio length), prepared for the network, and targets."""

    x: Tensor
    targets: dict[str, Tensor]


@torch.no_grad()
def make_group(net: EvaluatorNet, task: Task, items: list[dict], x: Tensor) -> Group:
    """Prepare a split (items and its stacked 'x') for training: images resized once to the network's
    input (resizing again is a no-op), audio kept raw (degradations act on the waveform), targets."""
    x = net.prepare(x) if net.cfg.dims == 2 else x.float()
    grid = _dense_grid(net, x)
    return Group(x, task.targets(items, grid, net.dense_stride))


def _dense_grid(net: EvaluatorNet, x: Tensor) -> tuple[int, ...]:
    if not net.cfg.dense_heads:
        return tuple(x.shape[2:])
    out = net.eval()(x[:1])
    return tuple(out[next(iter(net.cfg.dense_heads))].shape[2:])


# Degradations


def _blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Per-sample Gaussian blur; sigma (B,) in pixels (or samples for 1D)."""
    r = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, 5)
    b, c = x.shape[:2]
    if x.dim() == 4:
        kk = (k[:, :, None] * k[:, None, :]).repeat_interleave(c, 0)[:, None]  # (B*C, 1, 5, 5)
        y = F.conv2d(
            F.pad(x.reshape(1, b * c, *x.shape[2:]), (2, 2, 2, 2), mode="replicate"), kk, groups=b * c
        )
    else:
        kk = k.repeat_interleave(c, 0)[:, None]  # (B*C, 1, 5)
        y = F.conv1d(F.pad(x.reshape(1, b * c, -1), (2, 2), mode="replicate"), kk, groups=b * c)
    return y.reshape(x.shape)


def _low_res(x: Tensor) -> Tensor:
    size = x.shape[-1]
    small = F.interpolate(x, size=(size // 2, size // 2), mode="bilinear", antialias=True)
    return F.interpolate(small, size=(size, size), mode="bilinear")


def degrade(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random label-preserving degradations of a batch in [-1, 1]."""
    b = len(x)
    shape = (b,) + (1,) * (x.dim() - 1)

    def u(lo, hi, size=shape):
        return lo + (hi - lo) * torch.rand(size, generator=gen)

    def coin(p):
        return torch.rand(shape, generator=gen) < p

    if x.dim() == 4:
        x = torch.where(coin(0.25), _low_res(x), x)
        gain = u(0.85, 1.1, (b, x.shape[1], 1, 1))  # per channel: colours shift a little
        x = (x + 1) * gain - 1 + u(-0.05, 0.05, (b, x.shape[1], 1, 1))
    else:
        x = x * u(0.5, 1.3)
    x = x + torch.where(coin(0.5), u(0.0, 0.1), torch.zeros(shape)) * torch.randn(x.shape, generator=gen)
    sigma = u(0.3, 1.0, (b,))
    x = torch.where(coin(0.5), _blur(x, sigma), x)
    return x.clamp(-1, 1)


# Loop


def _lr(step: int, s: TrainSettings) -> float:
    warm = max(1, s.steps // 20)
    if step < warm:
        return s.lr * (step + 1) / warm
    return 0.5 * s.lr * (1 + math.cos(math.pi * (step - warm) / max(1, s.steps - warm)))


def _draw(groups: list[Group], batch: int, gen: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    sizes = torch.tensor([len(g.x) for g in groups], dtype=torch.float)
    g = groups[int(torch.multinomial(sizes, 1, generator=gen))]
    idx = torch.randint(len(g.x), (min(batch, len(g.x)),), generator=gen)
    return g.x[idx], {k: v[idx] for k, v in g.targets.items()}


def train_network(
    net: EvaluatorNet,
    task: Task,
    groups: list[Group],
    settings: TrainSettings,
    log: Callable[[str], None] = print,
) -> dict:
    """Train `net` in place on prepared groups; returns {"steps", "seconds", "final_loss"}."""
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    net.train()
    start, running = time.perf_counter(), None
    for step in range(settings.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, settings)
        x, targets = _draw(groups, settings.batch_size, gen)
        x, targets = task.transform(x, targets, gen)
        if settings.augment:
            x = degrade(x, gen)
        loss = total_loss(net.cfg, net(x), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            log(f"step {step + 1}/{settings.steps}  loss {running:.4f}  {time.perf_counter() - start:.0f}s")
    net.eval()
    return {"steps": settings.steps, "seconds": round(time.perf_counter() - start, 1), "final_loss": running}
