"""Shared pieces of the sampling-time controls: config checks, extra passes, map resizing, x0 algebra."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.attention import AttnCall, StepWindow, bus_state
from attnlab.errors import ConfigError

MAIN_ROLES = frozenset({"uncond", "cond"})  # the chunks the sampling loop itself runs


# Config checks


def window(start: float, end: float, owner: str) -> StepWindow:
    """A StepWindow, or a ConfigError naming the technique and the bad fractions."""
    return StepWindow(start, end, owner)


def check_choice(owner: str, key: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ConfigError(f"{owner}: {key}={value!r} is not one of {list(allowed)}")


def check_positive(owner: str, key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{owner}: {key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def require_layers(owner: str, model: nn.Module, layers: list, pattern, kind: str | None) -> None:
    """Raise a ConfigError listing the model's attention layers when a pattern selects none."""
    if layers:
        return
    from attnlab.attention import attention_layers

    names = [f"{n} ({m.kind})" for n, m in attention_layers(model).items()]
    raise ConfigError(
        f"{owner}: layers={pattern!r} selects no {kind or 'attention'} layer; the model has: "
        + (", ".join(names) or "no attention layers")
    )


def as_patterns(layers: str | Sequence[str]) -> tuple[str, ...]:
    return (layers,) if isinstance(layers, str) else tuple(layers)


# Passes and rows


def is_main_pass(call: AttnCall) -> bool:
    """True on the sampling loop's own model calls, False on a guidance's extra pass."""
    return set(call.roles) <= MAIN_ROLES


@contextmanager
def extra_pass(model: nn.Module, roles: tuple[str, ...], ctx: dict | None = None, t: Tensor | None = None):
    """Run model calls under other batch roles (e.g. ("pag",)), keeping the step the loop set.

    Controls tell a guidance's extra pass from the loop's own passes by its roles, so a heat map
    never records a perturbed pass and a cache never stores one. The previous state is restored.
    """
    st = bus_state(model)
    saved = (st.step, st.num_steps, st.timestep, st.roles)
    if ctx is not None:
        st.step, st.num_steps = ctx["i"], ctx["steps"]
    if t is not None:
        st.timestep = t
    st.roles = tuple(roles)
    try:
        yield st
    finally:
        st.step, st.num_steps, st.timestep, st.roles = saved


def rows(call: AttnCall, t: Tensor, role: str) -> Tensor:
    """The rows of `t` (batch first) that belong to `role`."""
    return t[call.chunk(t, role)]


def grid_tokens(call: AttnCall, n: int) -> bool:
    """Whether n query tokens form the call's grid (token merging, for one, breaks that)."""
    return math.prod(call.grid) == n


# Maps over the sample grid


def to_grid(m: Tensor, grid: tuple[int, ...]) -> Tensor:
    """(B, N, K) per-query values as (B, K, *grid)."""
    b, n, k = m.shape
    return m.transpose(1, 2).reshape(b, k, *grid)  # (B, K, *grid)


def resize(m: Tensor, size: tuple[int, ...], mode: str = "smooth") -> Tensor:
    """Resize (B, K, *grid) maps to (B, K, *size); 'smooth' = bicubic in 2D, linear in 1D."""
    if tuple(m.shape[2:]) == tuple(size):
        return m
    if mode == "nearest":
        return F.interpolate(m, size=size, mode="nearest")
    smooth = {1: "linear", 2: "bicubic", 3: "trilinear"}[len(size)]
    return F.interpolate(m, size=size, mode=smooth, align_corners=False)


def gaussian_kernel(sigma: float) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur over the spatial dims of (B, C, *spatial), reflect-padded, any dim."""
    return separable_blur(x, gaussian_kernel(sigma))


def separable_blur(x: Tensor, kernel: Tensor) -> Tensor:
    """(B, C, *spatial) convolved with the odd 1D `kernel` along every spatial dim, reflect-padded
    (replicate where a dim is too short to reflect): one 1D pass per dim equals the product kernel."""
    k = kernel.to(x)
    r = k.numel() // 2
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    for d in range(len(spatial)):
        moved = x.movedim(2 + d, -1)  # (B, C, ..., n_d)
        shape = moved.shape
        flat = moved.reshape(-1, 1, shape[-1])  # (B*C*rest, 1, n_d)
        flat = F.pad(flat, (r, r), mode="reflect" if shape[-1] > r else "replicate")
        flat = F.conv1d(flat, k.view(1, 1, -1))
        x = flat.reshape(shape).movedim(-1, 2 + d)
    return x.reshape(b, c, *spatial)
