"""Compute precision: fp32, or bf16 / fp16 autocast with fp32 master weights.

A model's `precision` attribute says how its forward computes (`set_precision`); the backbones run
their forward under `autocast(...)` and hand back the input's dtype, so every caller (the trainer,
the sampling loop, each guidance pass of a training-free control) gets the same precision without
casting anything itself. Weights, gradients and optimizer state stay fp32; convolutions and matmuls
run in the low precision; norms and softmax read low-precision inputs but compute in fp32.

The autocast is applied here rather than through `accelerate`'s `mixed_precision`, because
accelerate keeps one precision per process (`AcceleratorState`), and one process trains and samples
models of different precisions (tests, the PoC's in-process stages).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Literal

import torch
from torch import nn

from attnlab.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX), where bf16 pays off."""
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(p is not None for p in probes):
        return any(p() for p in probes if p is not None)
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve(precision: str, device: torch.device | str, key: str = "precision") -> str:
    """The precision a run uses: "auto" becomes bf16 where the device computes it natively (a CPU
    with avx512_bf16 or AMX, a GPU with bf16 support), else fp32.

    Raises:
        ConfigError: an unknown name, or fp16 on a CPU (no fast fp16 kernels, no loss scaling need).
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"{key}={precision!r} is not allowed: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"{key}=fp16 is not allowed on {device.type}: fp16 runs on CUDA only; use bf16 or fp32"
        )
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


def autocast(precision: str, device: torch.device | str):
    """The context a forward computes in: bf16 / fp16 autocast, or nothing for fp32."""
    device = torch.device(device)
    if precision in (None, "fp32", "auto"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def set_precision(model: nn.Module, precision: str) -> nn.Module:
    """Make `model`'s forward compute in `precision` (already resolved); returns the model."""
    if precision not in DTYPES:
        raise ConfigError(f"precision={precision!r} is not allowed: expected fp32, bf16 or fp16")
    model.precision = precision
    return model


def low_precision(x: torch.Tensor) -> bool:
    """Whether a tensor is bf16 or fp16 (what autocast hands the kernels below it)."""
    return x.dtype in (torch.bfloat16, torch.float16)
