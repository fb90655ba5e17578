"""The one trainer: any attnlab model and dataset, one or many processes through `accelerate`.

Every step's randomness (batch indices, condition dropout, timesteps, noise) comes from a generator
seeded by (seed, step, process), so a resumed run draws exactly what an uninterrupted run draws and,
with model, EMA and optimizer state restored from the checkpoint, ends with bit-identical weights.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from attnlab.conditioning import Condition
from attnlab.config import RunConfig
from attnlab.configio import DataFacts, model_fields_from_data
from attnlab.diffusion import alphas_cumprod, diffusion_loss
from attnlab.errors import ConfigError
from attnlab.io import write_json
from attnlab.models import resolve
from attnlab.precision import resolve as resolve_precision
from attnlab.precision import set_precision
from attnlab.runtime import tune_malloc
from attnlab.train import checkpoint as ckpt
from attnlab.train.batches import TrainingData, prepare_training_data
from attnlab.train.ema import EMA
from attnlab.train.log import LossLog

LOG = "log.jsonl"
# Keys a resumed run may change; anything else must match the checkpoint's config.
RESUMABLE_CHANGES = {"steps", "log_every", "ckpt_every", "keep_checkpoints", "threads", "progress"}


def train(cfg: RunConfig, out_dir: str | Path, model=None, data: TrainingData | None = None) -> Path:
    """Train a run, or resume it from its last checkpoint, up to `cfg.train.steps`.

    Args:
        cfg: the run config (model fields that are facts of the data are filled in from the data).
        out_dir: the run directory: config.json, log.jsonl, checkpoints/.
        model: use this model instead of `build_model(cfg.model)` (tests).
        data: use this training data instead of building the dataset (tests).
    Returns:
        The last checkpoint directory (a model directory for `load_model`).
    """
    return Trainer(cfg, out_dir, model, data).run()


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of one step of one process (SeedSequence mixes the three into one seed)."""
    s = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1]))


def lr_at(cfg, step: int) -> float:
    """Linear warm-up to `lr`, then constant or cosine decay to 10% at the last step."""
    t = cfg.train
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    if t.lr_schedule == "constant":
        return t.lr
    frac = (step - t.warmup) / max(1, t.steps - t.warmup)
    return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def fit_to_data(
    cfg: RunConfig, data: TrainingData, num_classes: int | None, context_dim: int | None
) -> RunConfig:
    """Set the model fields that the data decides (channels, size, dims, classes, token width)."""
    facts = DataFacts.of(cfg.data.name, data.x[0], num_classes, context_dim)
    model = dataclasses.replace(cfg.model, **model_fields_from_data(cfg.model.cond, facts))
    return dataclasses.replace(cfg, model=model)


class Trainer:
    def __init__(self, cfg: RunConfig, out_dir, model=None, data: TrainingData | None = None):
        self.cfg, self.out = cfg, Path(out_dir)
        # cpu=True lets accelerate see a torchrun/accelerate-launch world on a machine without GPUs (gloo)
        self.acc = Accelerator(cpu=not torch.cuda.is_available())
        self.model, self.data = model, data

    # Set-up

    def run(self) -> Path:
        tune_malloc()
        t = self.cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        world = self.acc.num_processes
        if t.batch_size % world:
            raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the {world} processes")
        self.data = self.data or self.build_data()
        found = ckpt.latest_checkpoint(self.out)
        self.settle_precision(found)
        start_ckpt = self._resume_point(found)
        if self.acc.is_main_process:
            ckpt.remove_partial(self.out)
            write_json(self.out / "config.json", self.cfg.to_dict())
        model = set_precision(self.model or self.build_model(), self.cfg.train.precision)
        ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        # fp16 gradients underflow without loss scaling (bf16 has fp32's range and needs none)
        self.scaler = torch.amp.GradScaler("cuda") if self.cfg.train.precision == "fp16" else None
        state = self._restore(start_ckpt, model, ema, opt)
        if state["step"] >= t.steps:
            self.acc.print(f"{self.out}: already trained to step {state['step']}")
            return start_ckpt
        # channels-last convolutions hand DDP 1x1-conv grads in another stride order; it copies them, harmlessly
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        model, opt = self.acc.prepare(model, opt)
        if ema is not None:
            ema.to(self.acc.device)
        last = self._loop(model, ema, opt, state)
        if self.acc.num_processes > 1:
            # gloo's threads can abort the process at exit unless its group is torn down first
            self.acc.wait_for_everyone()
            self.acc.end_training()
        return last

    def build_data(self) -> TrainingData:
        from attnlab.data import build_dataset

        dataset = build_dataset(self.cfg.data, "train")
        encoder = None
        if self.cfg.model.cond == "text":
            from attnlab.conditioning.text import TextEncoder

            encoder = TextEncoder()
        data = prepare_training_data(dataset, self.cfg.model.cond, encoder)
        self.cfg = fit_to_data(self.cfg, data, dataset.num_classes, encoder.dim if encoder else None)
        return data

    def build_model(self):
        from attnlab.models import build_model

        torch.manual_seed(self.cfg.train.seed)  # the same init in every process and on every rerun
        return build_model(self.cfg.model)

    def settle_precision(self, found: Path | None) -> None:
        """train.precision as this run computes it: "auto" resolved for the device, or, resuming,
        the precision the run was trained in (a resumed run continues in its own precision)."""
        t = self.cfg.train
        p = t.precision
        if p == "auto" and found is not None:
            p = ckpt.read_config(found).train.precision
        p = resolve_precision(p, self.acc.device, "train.precision")
        self.cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(t, precision=p))

    def _resume_point(self, found: Path | None) -> Path | None:
        if found is not None:
            self._check_same_run(ckpt.read_config(found), found)
            self._check_same_world(ckpt.read_trainer_state(found), found)
        return found

    def _check_same_world(self, state: dict, where: Path) -> None:
        """Each process draws its batch from (seed, step, process index) with batch_size / processes
        items, so another process count draws other batches: refuse rather than resume inexactly."""
        was, now = state.get("processes"), self.acc.num_processes
        if was is not None and was != now:
            raise ConfigError(
                f"{self.out} was trained with {was} process(es) but this run has {now} "
                f"({where / ckpt.STATE}); resume with {was} process(es) or train into a new --out"
            )

    def _check_same_run(self, old: RunConfig, where: Path) -> None:
        a, b = old.to_dict(), self.cfg.to_dict()
        for k in RESUMABLE_CHANGES:
            a["train"].pop(k), b["train"].pop(k)
        diff = [f"{s}.{k}" for s in b for k in b[s] if a.get(s, {}).get(k) != b[s][k]]
        if diff:
            raise ConfigError(
                f"{self.out} holds a run with a different config ({', '.join(diff[:4])} differ from "
                f"{where / ckpt.CONFIG}); resume with the same config or train into a new --out"
            )

    def _restore(self, found: Path | None, model, ema, opt) -> dict:
        if found is None:
            return {"step": 0, "log_bytes": 0, "wall": 0.0}
        ckpt.load_weights(model, found / ckpt.MODEL)
        if ema is not None:
            ema.load_state_dict(ckpt.read_tensors(found / ckpt.EMA_WEIGHTS))
        opt.load_state_dict(ckpt.read_optimizer_state(found / ckpt.OPTIMIZER))
        state = ckpt.read_trainer_state(found)
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.acc.print(f"resuming {self.out} from step {state['step']}")
        return state

    # The loop

    def _loop(self, model, ema, opt, state) -> Path:
        cfg, acc = self.cfg, self.acc
        t = cfg.train
        data = self.data.to(acc.device)
        ab = alphas_cumprod(cfg.diffusion.num_train_timesteps, cfg.diffusion.beta_schedule).to(acc.device)
        per_proc = t.batch_size // acc.num_processes
        self.plan = resolve(cfg.model)  # the techniques, resolved once for every step
        # the log is cut back to its size at the checkpoint: the steps since are trained again
        log = LossLog(self.out / LOG, keep_bytes=state["log_bytes"]) if acc.is_main_process else None
        bar = tqdm(
            total=t.steps,
            initial=state["step"],
            disable=not (acc.is_main_process and t.progress),
            desc=f"train ({t.precision})",
        )
        wall0, tick, window, window_steps, last = time.perf_counter(), time.perf_counter(), 0.0, 0, None
        model.train()
        for step in range(state["step"], t.steps):
            lr = lr_at(cfg, step)
            loss = self._step(model, opt, data, ab, step, per_proc, lr)
            if ema is not None:
                ema.update(acc.unwrap_model(model), step)
            window, window_steps, done = window + loss, window_steps + 1, step + 1
            bar.update(1)
            if done % t.log_every == 0 or done == t.steps:
                mean = acc.reduce(torch.tensor([window / window_steps], device=acc.device), "mean").item()
                now = time.perf_counter()
                record = {
                    "step": done,
                    "loss": mean,
                    "lr": lr,
                    "ema_decay": ema.decay_at(step) if ema else None,
                    "images_per_s": window_steps * t.batch_size / (now - tick),
                    "wall": state["wall"] + now - wall0,
                }
                if log:
                    log.append(record)
                bar.set_postfix(loss=f"{mean:.4f}")
                tick, window, window_steps = now, 0.0, 0
            if done % t.ckpt_every == 0 or done == t.steps:
                last = self._save(model, ema, opt, done, log, state["wall"] + time.perf_counter() - wall0)
        bar.close()
        acc.print(f"model directory: {last}")
        return last

    def _step(self, model, opt, data, ab, step, per_proc, lr) -> float:
        cfg = self.cfg
        g = step_generator(cfg.train.seed, step, self.acc.process_index)
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))  # dropout layers, if any
        idx = torch.randint(0, len(data), (per_proc,), generator=g).to(self.acc.device)
        x0, cond = data.batch(idx)
        cond = self.plan.training_condition(x0, cond, g)  # e.g. mask_cond's regions to inpaint
        cond = drop_condition(cond, cfg.diffusion.cond_drop, g)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = diffusion_loss(
            model,
            x0,
            cond,
            ab,
            prediction=cfg.diffusion.prediction,
            generator=g,
            min_snr_gamma=cfg.diffusion.min_snr_gamma,
        )
        if self.scaler is None:
            self.acc.backward(loss)
            if cfg.train.grad_clip > 0:
                self.acc.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
        else:
            self.acc.backward(self.scaler.scale(loss))
            self.scaler.unscale_(opt)  # clip the true gradients
            if cfg.train.grad_clip > 0:
                self.acc.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            self.scaler.step(opt)  # skipped when the scaled gradients overflowed
            self.scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def _save(self, model, ema, opt, step, log, wall) -> Path:
        acc, path = self.acc, None
        if acc.is_main_process:
            path = ckpt.save_checkpoint(
                self.out,
                step,
                self.cfg,
                acc.unwrap_model(model),
                ema.state_dict() if ema else None,
                opt.state_dict(),
                {
                    "log_bytes": log.size(),
                    "wall": wall,
                    "processes": acc.num_processes,
                    **({"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
                },
                keep=self.cfg.train.keep_checkpoints,
            )
        acc.wait_for_everyone()
        return path or ckpt.latest_checkpoint(self.out)


def drop_condition(cond: Condition | None, p: float, g: torch.Generator) -> Condition | None:
    """Replace each row's condition by the null one with probability p (Ho & Salimans 2022)."""
    if cond is None or p <= 0:
        return cond
    keep = (torch.rand(len(cond), generator=g) >= p).to(_device(cond))
    return cond.where(keep, cond.null_like())


def _device(cond: Condition):
    return next(t for t in (cond.labels, cond.tokens, cond.inpaint) if t is not None).device
