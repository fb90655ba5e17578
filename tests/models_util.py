"""Tiny model configs and conditions shared by the model tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import torch

from attnlab.conditioning import Condition
from attnlab.models import ModelConfig, build_model

CTX = 12  # text token width in tests (the real encoder's is 384)

# The smallest training run the trainer tests share (class-conditional digits, a 2-level U-Net);
# each test adds its own steps, schedule and checkpointing.
TINY_RUN = [
    "data.num=64",
    "model.cond=class",
    "model.width=16",
    "model.channel_mult=[1,2]",
    "model.attn_resolutions=[8]",
    "train.batch_size=8",
    "train.progress=false",
]


def tiny_config(backbone: str, dims: int, cond: str = "none", **kw) -> ModelConfig:
    size = 16 if dims == 2 else 32
    base = dict(
        backbone=backbone, dims=dims, in_channels=2, size=size, cond=cond, num_classes=3, context_dim=CTX
    )
    if backbone == "unet":
        base.update(width=16, channel_mult=(1, 2), attn_resolutions=(size // 2,), heads=2, norm_groups=4)
    else:
        base.update(width=32, depth=2, heads=2, patch=4)
    return ModelConfig(**{**base, **kw})


def perturbed(cfg: ModelConfig, seed: int = 0, scale: float = 0.05):
    """The model with noise on every weight, so zero-initialised layers do not hide any path."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def inputs(cfg: ModelConfig, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.sample_shape(batch), generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t, condition(cfg, batch, g)


def condition(cfg: ModelConfig, batch: int, g: torch.Generator) -> Condition | None:
    if cfg.cond == "class":
        return Condition(labels=torch.arange(batch) % cfg.num_classes)
    if cfg.cond == "text":
        tokens = torch.randn(batch, 5, CTX, generator=g)
        mask = torch.ones(batch, 5, dtype=torch.bool)
        mask[0, 2:] = False  # row 0 has 2 real tokens and 3 padding tokens
        return Condition(tokens=tokens, mask=mask)
    return None


def torchrun_train(config, out, overrides, processes: int) -> list[str]:
    """The `attnlab train` command under torchrun with `processes` CPU processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port of its own, not 29500 (another run on the machine may hold it)
        "--nproc_per_node",
        str(processes),
        "-m",
        "attnlab",
        "train",
        str(config),
        *overrides,
        "--out",
        str(out),
    ]


TORCHRUN_TIMEOUT = 300  # seconds; a tiny run takes well under a minute


def run_torchrun(cmd: list[str], env: dict, out) -> subprocess.CompletedProcess:
    """Run a torchrun command; on a hang (seen rarely: a rank waiting in gloo's teardown after its
    peer has exited) kill its whole process group, clear `out` and run it once more, so a rare
    teardown hang costs minutes, not the whole CI run. A second hang fails with that message."""
    for _ in range(2):
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
        )
        try:
            stdout, stderr = proc.communicate(timeout=TORCHRUN_TIMEOUT)
            return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            shutil.rmtree(out, ignore_errors=True)
    raise AssertionError(f"torchrun hung twice (over {TORCHRUN_TIMEOUT} s each): {' '.join(cmd)}")
