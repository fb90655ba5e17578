"""The training stage of a PoC: one run per distinct architecture, through the one trainer (which
resumes from its last checkpoint), with a budget in steps or in wall-clock minutes."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

import torch
import torch.multiprocessing as mp
from tqdm.auto import tqdm

from attnlab.config import RunConfig, SampleConfig
from attnlab.errors import ConfigError
from attnlab.poc.config import PocConfig, VariantConfig
from attnlab.poc.stages import VariantDirs, fingerprint, run_stage
from attnlab.poc.variants import variant_model
from attnlab.precision import resolve as resolve_precision
from attnlab.train import train
from attnlab.train.batches import TrainingData
from attnlab.train.trainer import fit_to_data

# Train-config keys that change how a run is shown or checkpointed, not what it learns.
_PRESENTATION = ("progress", "threads", "log_every", "ckpt_every", "keep_checkpoints")


def run_config(
    cfg: PocConfig,
    owner: VariantConfig,
    data: TrainingData,
    num_classes,
    context_dim,
    steps: int,
    seed: int | None = None,
) -> RunConfig:
    """The run config a model owner trains with from training seed `seed` (default `train.seed`;
    model fields that are facts of the data filled in, precisions resolved for this machine)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_precision = resolve_precision(cfg.train.precision, device, "train.precision")
    sample_precision = resolve_precision(cfg.sample.precision, device, "sample.precision")
    rc = RunConfig(
        data=cfg.data,
        model=variant_model(cfg, owner),
        diffusion=cfg.diffusion,
        train=dataclasses.replace(
            cfg.train,
            steps=steps,
            seed=cfg.train.seed if seed is None else seed,
            precision=train_precision,
        ),
        sample=SampleConfig(
            cfg.sample.sampler, cfg.budget.sample_steps, cfg.sample.guidance, sample_precision
        ),
    )
    return fit_to_data(rc, data, num_classes, context_dim)


def learning_fingerprint(rc: RunConfig) -> str:
    """What decides the trained weights: the run config without presentation keys and without the
    sampling settings (a change of sampling steps redraws samples, it does not retrain)."""
    d = rc.to_dict()
    d.pop("sample", None)
    for k in _PRESENTATION:
        d["train"].pop(k, None)
    return fingerprint("train", without_fp32(d, "train"))


def without_fp32(d: dict, section: str) -> dict:
    """`d` without `d[section]["precision"]` when it is fp32, the precision of every run before the
    key existed: their stages' fingerprints, and so their finished work, stay valid."""
    if d.get(section, {}).get("precision") == "fp32":
        d = {**d, section: {k: v for k, v in d[section].items() if k != "precision"}}
    return d


def budget_steps(
    cfg: PocConfig,
    rc: RunConfig,
    data: TrainingData,
    dirs: VariantDirs,
    sharing: tuple[int, float] = (0, 1.0),
) -> int:
    """Steps to train: `budget.train_steps`, or `train_minutes` turned into steps once and kept.
    `sharing`: (torch threads per training process, slowdown from processes sharing the cores),
    so that models trained side by side also finish in about the minutes asked."""
    if cfg.budget.train_steps is not None:
        return cfg.budget.train_steps
    fp = fingerprint(
        "budget",
        cfg.budget.train_minutes,
        learning_fingerprint(dataclasses.replace(rc, train=dataclasses.replace(rc.train, steps=0))),
    )
    record = run_stage(
        dirs.marker("budget"), fp, lambda: _budget(rc, data, cfg.budget.train_minutes, sharing)
    )
    return int(record["steps"])


def _budget(rc: RunConfig, data: TrainingData, minutes: float, sharing: tuple[int, float]) -> dict:
    """The steps that fit in `minutes`, from the measured seconds per step."""
    threads, slowdown = sharing
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        sec = seconds_per_step(rc, data) * slowdown
    finally:
        torch.set_num_threads(before)
    return {
        "seconds_per_step": sec,
        "steps": max(1, int(minutes * 60 / sec)),
        "minutes": minutes,
        "threads": threads or before,
        "slowdown": slowdown,
    }


def seconds_per_step(
    rc: RunConfig, data: TrainingData, timed_steps: int = 3, clock=time.perf_counter
) -> float:
    """Seconds of one training step of this model and batch size (after one untimed step): wall
    seconds, or with `clock=time.process_time` this process's CPU seconds (which other load on the
    machine moves much less)."""
    from attnlab.diffusion import alphas_cumprod, diffusion_loss
    from attnlab.models import build_model
    from attnlab.precision import DTYPES, set_precision

    torch.manual_seed(rc.train.seed)
    model = build_model(rc.model).train()
    if rc.train.precision in DTYPES:  # resolved: time the step in the precision it trains in
        set_precision(model, rc.train.precision)
    opt = torch.optim.AdamW(model.parameters(), lr=rc.train.lr)
    ab = alphas_cumprod(rc.diffusion.num_train_timesteps, rc.diffusion.beta_schedule)
    g = torch.Generator().manual_seed(0)
    start = 0.0
    for i in range(timed_steps + 1):
        if i == 1:
            start = clock()
        x0, cond = data.batch(torch.randint(0, len(data), (rc.train.batch_size,), generator=g))
        diffusion_loss(model, x0, cond, ab, prediction=rc.diffusion.prediction, generator=g).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (clock() - start) / timed_steps


def train_stage(rc: RunConfig, dirs: VariantDirs, data: TrainingData, side_by_side: int = 1) -> dict:
    """Train (or resume) the model of `rc` in `dirs.model`; skipped when already trained for `rc`.
    `side_by_side`: how many models trained at once with this one (recorded for the report)."""
    from attnlab.evaluate import training_time

    def fit() -> dict:
        ckpt = train(rc, dirs.model, data=data)
        return {
            "checkpoint": str(ckpt.relative_to(dirs.root)),
            "steps": rc.train.steps,
            "side_by_side": side_by_side,
            **training_time(dirs.model),
        }

    return run_stage(dirs.marker("trained"), learning_fingerprint(rc), fit)


# Several models side by side


def train_processes(requested: int, pending: int, threads: int) -> int:
    """How many models to train at once: `requested` when set, else one process per pending model
    up to twice the CPU cores on a CPU-only machine (1 on a GPU: its models share one device)."""
    if requested:
        return max(1, min(requested, pending))
    if torch.cuda.is_available() or pending <= 1:
        return 1
    return max(1, min(pending, 2 * (threads or os.cpu_count() or 1)))


def _worker(
    rc: RunConfig, dirs: VariantDirs, data: TrainingData, threads: int, n: int, errors, parent: int
) -> None:
    _exit_with(parent)
    torch.set_num_threads(threads)
    try:
        quiet = dataclasses.replace(rc, train=dataclasses.replace(rc.train, progress=False))
        train_stage(quiet, dirs, data, side_by_side=n)
    except BaseException as e:  # noqa: BLE001  (the parent reports it with the variant's name)
        errors.put((dirs.root.name, f"{type(e).__name__}: {e}"))
        errors.close()
        errors.join_thread()  # the message is in the pipe before this process exits
        raise SystemExit(1) from None


def _exit_with(parent: int, every: float = 0.5) -> None:
    """End this process when process `parent` is gone. A PoC killed with SIGKILL cannot stop its
    training processes; left running, they would keep writing checkpoints into the directories the
    rerun resumes from. What they leave is whole: checkpoints are written atomically."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def train_side_by_side(
    jobs: list[tuple[RunConfig, VariantDirs]],
    data: TrainingData,
    processes: int,
    threads: int,
    progress: bool = True,
) -> None:
    """Train `jobs` in `processes` spawned processes of `threads` torch threads each. Small models train faster as single-threaded processes than with threads. A
    process killed here leaves its last checkpoint; the next run resumes it. When one variant fails, the
    others still train to the end (their finished stages are kept) before the failure is raised.

    Raises:
        ConfigError: naming each variant whose training failed, and why.
    """
    ctx = mp.get_context("spawn")  # never fork a process whose OpenMP pool is running
    errors = ctx.Queue()
    queue, running, failed, why = list(range(len(jobs))), {}, [], {}
    steps = {i: 0 for i in queue}
    bar = tqdm(
        total=sum(rc.train.steps for rc, _ in jobs),
        desc=f"train ({processes} processes)",
        leave=False,
        disable=not progress,
    )
    try:
        while queue or running:
            while queue and len(running) < processes:
                i = queue.pop(0)
                rc, dirs = jobs[i]
                running[i] = ctx.Process(
                    target=_worker,
                    args=(rc, dirs, data, threads, min(processes, len(jobs)), errors, os.getpid()),
                    daemon=True,
                )
                running[i].start()
            time.sleep(1.0)
            _drain(errors, why)  # as they come, so no worker waits on a full pipe
            for i, p in list(running.items()):
                steps[i] = _logged_step(jobs[i][1])
                if not p.is_alive():
                    p.join()
                    del running[i]
                    if p.exitcode != 0:
                        failed.append((jobs[i][1].root.name, p.exitcode))
                    else:
                        steps[i] = jobs[i][0].train.steps
            bar.n = sum(steps.values())
            bar.refresh()
    finally:
        for p in running.values():  # Ctrl-C: stop the rest, checkpoints stay
            p.terminate()
            p.join()
        bar.close()
    _drain(errors, why)
    if failed:
        raise ConfigError(
            "; ".join(
                f"training variant {name!r} failed: {why.get(name, f'its process exited with code {code}')}"
                for name, code in failed
            )
        )


def _drain(errors, why: dict[str, str]) -> None:
    """Move the workers' (variant, error) messages from the queue into `why`."""
    while not errors.empty():
        name, message = errors.get(timeout=5)
        why[name] = message


def _logged_step(dirs: VariantDirs) -> int:
    """The last step in a run's loss log (0 before the first line)."""
    try:
        with open(dirs.model / "log.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            last = f.read().splitlines()[-1]
        return int(json.loads(last)["step"])
    except (OSError, IndexError, ValueError, KeyError):
        return 0
