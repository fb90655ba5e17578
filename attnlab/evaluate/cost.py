"""Cost: parameters, FLOPs, sampling latency, peak memory and training time of a denoiser.

How each number is measured (and what it leaves out):
    params            trainable and frozen parameters of the model (`numel`, no buffers).
    flops_per_call    FLOPs of one denoiser call on one sample, counted by
                      torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention;
                      elementwise ops are not counted, as is usual). The CPU fused attention kernel
                      has no formula in PyTorch; attnlab adds the standard 4*B*H*Lq*Lk*d one.
    flops_per_sample  FLOPs of a whole sampling run divided by its samples: includes CFG's
                      doubled batch, extra guidance calls (PAG, SAG) and savings (T-GATE, caching).
    latency_s         wall seconds per sample of a sampling run (best of `repeats`, after one
                      untimed warm-up run when `warmup`), with the threads torch is set to use.
    peak_mem_bytes    on CUDA: torch.cuda.max_memory_allocated during the run, less what was
                      allocated before it. On CPU: the most bytes of tensors alive at once among
                      those allocated during the run, from the profiler's allocation events (torch
                      tensors only, weights and earlier tensors excluded; a temporary freed inside
                      one operator counts only as its net). Process RSS is not used: it keeps the
                      high-water mark of everything run before and would blame one variant for another.
    train_seconds     from a run's loss log (log.jsonl): wall seconds of training at its last
                      record, summed over resumes; with train_steps and mean samples per second.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from attnlab.errors import CheckpointError


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


class _GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker, so every count goes to "Global". The
    tracker's backward hooks reject torch.autograd.grad inside the counted code, which sampling-time
    optimisation (Attend-and-Excite) runs; attnlab only needs the total."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def _flop_counter() -> FlopCounterMode:
    extra = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        extra[cpu_sdpa] = _cpu_sdpa_flop
    counter = FlopCounterMode(display=False, custom_mapping=extra)
    counter.mod_tracker = _GlobalOnly()
    return counter


@torch.no_grad()
def count_flops(run: Callable[[], Any]) -> int:
    """Total FLOPs of the torch operators `run()` executes (gradients it takes itself included)."""
    with _flop_counter() as counter:
        run()
    return int(counter.get_total_flops())


def denoiser_flops(model: nn.Module, sample_shape: Sequence[int], cond=None, t: float = 500.0) -> int:
    """FLOPs of one denoiser call on one sample of shape (C, *spatial) at timestep t."""
    param = next(model.parameters())
    x = torch.zeros(1, *sample_shape, device=param.device, dtype=param.dtype)
    tt = torch.full((1,), t, device=param.device)
    cond = cond.index(slice(0, 1)).to(param.device) if cond is not None else None
    was_training = model.training
    model.eval()
    try:
        return count_flops(lambda: model(x, tt, cond))
    finally:
        model.train(was_training)


def timed(run: Callable[[], Any]) -> tuple[Any, float]:
    """(run(), wall seconds), synchronising CUDA so queued kernels are counted."""
    _sync()
    start = time.perf_counter()
    out = run()
    _sync()
    return out, time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sampling_latency(
    run: Callable[[], Any], n_samples: int, *, repeats: int = 1, warmup: bool = True
) -> float:
    """Wall seconds per sample of `run()` (which draws n_samples): best of `repeats` timed runs."""
    if warmup:
        run()
    return min(timed(run)[1] for _ in range(max(1, repeats))) / n_samples


def peak_memory(run: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensors allocated by `run()` and alive at once (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_chatter(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage  # + allocated, - freed ([memory] events), net per operator
        peak = max(peak, live)
    return int(peak)


# what libkineto writes straight to file descriptor 2 on every profiler start and stop
_KINETO_LINE = re.compile(rb"^(USDT|STAGE|INFO):\d{4}-\d\d-\d\d [\d:]+ \d+:\d+ \w+\.cpp:\d+\] ")


@contextlib.contextmanager
def _without_profiler_chatter() -> Iterator[None]:
    """Hold back the profiler's routine C++ log lines; anything else written to stderr is passed on."""
    fd = 2  # where the C++ logger writes, whatever sys.stderr is in Python
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            held.seek(0)
            rest = b"".join(line for line in held if not _KINETO_LINE.match(line))
            while rest:
                rest = rest[os.write(fd, rest) :]


def training_time(run: str | Path) -> dict:
    """Training time of a run from its loss log.

    Args:
        run: the run directory (holding log.jsonl) or the log file itself.

    Returns:
        {"train_seconds", "train_steps", "samples_per_s"} from the log's records.
    """
    path = Path(run)
    path = path / "log.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise CheckpointError(f"{path}: no loss log (expected the run's log.jsonl)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    records = [r for r in records if isinstance(r, dict) and "wall" in r and "step" in r]
    if not records:
        raise CheckpointError(f"{path}: no records with 'step' and 'wall' in the loss log")
    rates = [r["images_per_s"] for r in records if r.get("images_per_s")]
    return {
        "train_seconds": float(records[-1]["wall"]),
        "train_steps": int(records[-1]["step"]),
        "samples_per_s": float(sum(rates) / len(rates)) if rates else None,
    }


def cost(
    model: nn.Module,
    sample_shape: Sequence[int],
    cond=None,
    *,
    sampler: Callable[[], Tensor] | None = None,
    n_samples: int = 1,
    run_dir: str | Path | None = None,
    repeats: int = 1,
    memory: bool = True,
) -> dict:
    """The cost table of one denoiser (and, given a sampler, of sampling with it).

    Args:
        model: the denoiser, called as model(x, t, cond).
        sample_shape: (C, *spatial) of one sample.
        cond: a Condition whose first row is used for the per-call FLOPs (None: unconditional).
        sampler: a callable that draws `n_samples` samples the way the evaluation does (same steps,
            guidance, controls); enables flops_per_sample, latency_s and peak_mem_bytes.
        n_samples: how many samples one sampler call draws.
        run_dir: the training run directory, for train_seconds.
        repeats: timed sampler runs (the best counts).
        memory: measure peak memory (one more sampler run, under the profiler on CPU).

    Returns:
        {"params", "flops_per_call"} and, as available, "flops_per_sample", "latency_s",
        "peak_mem_bytes", "train_seconds", "train_steps", "samples_per_s".
    """
    out: dict = {
        "params": count_parameters(model),
        "flops_per_call": denoiser_flops(model, sample_shape, cond),
    }
    if sampler is not None:
        out["latency_s"] = sampling_latency(sampler, n_samples, repeats=repeats)
        out["flops_per_sample"] = count_flops(sampler) / n_samples
        if memory:
            out["peak_mem_bytes"] = peak_memory(sampler, next(model.parameters()).device)
    if run_dir is not None:
        out.update(training_time(run_dir))
    return out
