"""attnlab's main job against what one would write with diffusers: the demo's reference U-Net and a
diffusers `UNet2DConditionModel` of the same size, trained for the same minutes on the same data,
with the recipe of diffusers' training examples and with attnlab's, judged by the same evaluator.

    .venv/bin/python benchmarks/peer_recipe.py --out runs/peer-recipe      # 3 rows x 3 training seeds, ~50 CPU-minutes
    .venv/bin/python benchmarks/peer_recipe.py --minutes 0.3 --seeds 0 --num 16 --points 2 --out /tmp/peer  # a smoke run

Rows (the data, sampler and judge are `benchmarks/configs/shapes32-text-peer.yaml`'s):
- diffusers' `UNet2DConditionModel` (16-32-48 channels, cross-attention at 16 and 8 px; parameters
  and FLOPs per call within 10% of the reference) with **diffusers' recipe**: the defaults of
  `examples/text_to_image/train_text_to_image.py` (epsilon prediction on Stable Diffusion's
  scaled-linear betas, AdamW at 1e-4 with weight decay 1e-2, 500 warm-up steps then a constant
  rate, gradients clipped at 1, the `--use_ema` EMA: decay 0.9999 with diffusers' (1+n)/(10+n)
  warm-up, no min-SNR weighting). The unconditional example differs in its linear betas, a cosine
  rate and weight decay 1e-6; its rate and warm-up, which decide a short run, are the same.
- the same `UNet2DConditionModel` with **attnlab's recipe** (v prediction on the cosine schedule,
  min-SNR-5 weighting, AdamW at 2e-3 with 50 warm-up steps and cosine decay, EMA 0.999);
- **attnlab's reference** U-Net with attnlab's recipe.
Every row keeps the batch (32) and the 10% condition dropout classifier-free guidance needs, so
the rows differ only in architecture and recipe. Precision is part of the recipe: diffusers'
examples train in fp32 unless asked for mixed precision, attnlab's "auto" takes bf16 autocast on a
CPU with native bf16 (on this machine fp32 is the faster of the two for `UNet2DConditionModel`).

Equal minutes: each row's CPU seconds per training step are measured first (single-threaded, so
CPU time is the wall time of an otherwise idle core and moves little with other load; rows
interleaved over rounds) and turned into the steps that fit `--minutes`; the count is kept in OUT/budget.json so a rerun trains to the same step. Runs train
`--processes` at a time, each single-threaded. Each run is scored at `--points` checkpoints
(training curves) on `--num` eval prompts (sample k: eval caption k, seed k; DDIM 20 steps,
guidance 1.5): the share of samples with every asked attribute right and evaluator-feature FID
against the whole eval split. Intervals are 95% Student-t over training seeds. A killed run
resumes: training from its checkpoints, scoring from OUT/scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch

CONFIG = Path(__file__).parent / "configs" / "shapes32-text-peer.yaml"

DIFFUSERS_UNET = {
    "backbone": "diffusers",
    "diffusers_class": "UNet2DConditionModel",
    "diffusers_config": {
        "block_out_channels": [16, 32, 48],
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "norm_num_groups": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    },
}
DIFFUSERS_RECIPE = {
    "diffusion": {"prediction": "epsilon", "beta_schedule": "scaled_linear", "min_snr_gamma": None},
    "train": {
        "lr": 1e-4,
        "lr_schedule": "constant",
        "warmup": 500,
        "weight_decay": 1e-2,
        "ema_decay": 0.9999,
        "precision": "fp32",
    },  # fmt: skip  (the examples' default: no mixed precision)
}
ATTNLAB_RECIPE: dict = {}  # the config file's

ROWS = {
    "diffusers UNet2DConditionModel, diffusers' recipe": (DIFFUSERS_UNET, DIFFUSERS_RECIPE),
    "diffusers UNet2DConditionModel, attnlab's recipe": (DIFFUSERS_UNET, ATTNLAB_RECIPE),
    "attnlab reference U-Net, attnlab's recipe": ({}, ATTNLAB_RECIPE),
}
# named deviations, reported apart (--ablations): which part of diffusers' recipe decides a short run
ABLATIONS = {
    "diffusers UNet2DConditionModel, diffusers' recipe at attnlab's rate and warm-up": (
        DIFFUSERS_UNET,
        {**DIFFUSERS_RECIPE, "train": {**DIFFUSERS_RECIPE["train"], "lr": 2e-3, "warmup": 50}},
    ),
}
REFERENCE = "attnlab reference U-Net, attnlab's recipe"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/peer-recipe")
    p.add_argument(
        "--minutes", type=float, default=5.0, help="single-threaded CPU minutes of training per run"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--num", type=int, default=96, help="eval prompts per score")
    p.add_argument("--points", type=int, default=4, help="scored checkpoints per run (the curve)")
    p.add_argument("--processes", type=int, default=2, help="runs trained at once")
    p.add_argument("--threads", type=int, default=2, help="torch threads for scoring")
    p.add_argument("--ablations", action="store_true", help="also train the named deviations (first seed)")
    p.add_argument("--results", help="also write the table and curves here (e.g. benchmarks/results)")
    return p.parse_args()


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


# Configs


def run_config(row: str, rows: dict, seed: int, steps: int = 10, ckpt_every: int | None = None):
    from omegaconf import OmegaConf

    from attnlab.config import RunConfig
    from attnlab.configio import build_structured

    model, recipe = rows[row]
    every = ckpt_every or steps
    layers = [
        OmegaConf.load(CONFIG),
        OmegaConf.create({"model": model, **recipe}),
        OmegaConf.create({"train": {"steps": steps, "seed": seed, "threads": 1, "progress": False,
                                    "ckpt_every": every, "keep_checkpoints": 64}}),
    ]  # fmt: skip
    return build_structured(RunConfig, layers, f"{CONFIG} ({row})")


def checkpoint_every(steps: int, points: int, log_every: int) -> int:
    return max(log_every, math.ceil(steps / points / log_every) * log_every)


# Equal minutes


def calibrate(rows: dict, minutes: float, out: Path, rounds: int = 4) -> dict:
    """Steps per row that fit `minutes` single-threaded, measured once and kept."""
    from attnlab.io import write_json
    from attnlab.poc.training import seconds_per_step
    from attnlab.precision import resolve as resolve_precision
    from attnlab.train.batches import prepare_training_data
    from attnlab.train.trainer import fit_to_data

    file = out / "budget.json"
    kept = json.loads(file.read_text()) if file.is_file() else {}
    todo = [r for r in rows if kept.get(r, {}).get("minutes") != minutes]
    if todo:
        from attnlab.conditioning.text import TextEncoder
        from attnlab.data import build_dataset

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        base = run_config(todo[0], rows, 0)
        encoder = TextEncoder()
        data = prepare_training_data(build_dataset(base.data, "train"), "text", encoder)
        times: dict[str, list[float]] = {r: [] for r in todo}
        for k in range(rounds):
            for r in todo[k % len(todo) :] + todo[: k % len(todo)]:
                rc = fit_to_data(run_config(r, rows, 0), data, None, encoder.dim)
                rc = dataclasses.replace(
                    rc,
                    train=dataclasses.replace(
                        rc.train, precision=resolve_precision(rc.train.precision, "cpu")
                    ),
                )
                times[r].append(seconds_per_step(rc, data, timed_steps=6, clock=time.process_time))
        torch.set_num_threads(before)
        for r in todo:
            sec = statistics.median(times[r])
            kept[r] = {"minutes": minutes, "seconds_per_step": sec, "steps": max(1, int(minutes * 60 / sec)),
                       "timings": times[r]}  # fmt: skip
            print(f"{r}: {sec:.3f} s/step -> {kept[r]['steps']} steps", flush=True)
        write_json(file, kept)
    return kept


# Training


def _train(row: str, rows: dict, seed: int, steps: int, every: int, run_dir: str) -> str:
    torch.set_num_threads(1)
    from attnlab.train.trainer import train

    t0 = time.perf_counter()
    train(run_config(row, rows, seed, steps, every), run_dir)
    return f"{row} seed {seed}: {time.perf_counter() - t0:.0f} s"


def train_all(jobs: list[tuple], processes: int) -> None:
    if processes <= 1:
        for job in jobs:
            print(_train(*job), flush=True)
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        for f in as_completed([pool.submit(_train, *job) for job in jobs]):
            print(f.result(), flush=True)


# Scoring


class Judge:
    """The evaluator, the eval prompts and the real features, loaded once."""

    def __init__(self, num: int):
        from attnlab.conditioning.text import TextEncoder
        from attnlab.data import build_dataset
        from attnlab.evaluate import Evaluator
        from attnlab.evaluate.quality import extract_features

        cfg = run_config(REFERENCE, ROWS, 0)
        eval_set = build_dataset(cfg.data, "eval")
        self.prompts = eval_set.texts()[:num]
        self.ev = Evaluator.load("shapes")
        self.feature = self.ev.feature_net()
        self.real = extract_features(eval_set.tensors(), self.feature)
        self.encoder = TextEncoder()

    def score(self, ckpt: Path) -> dict:
        from attnlab.evaluate import alignment
        from attnlab.evaluate.quality import extract_features, fid_kid_from_features
        from attnlab.generate import Item, generate
        from attnlab.train.checkpoint import load_model, read_trainer_state

        model, cfg = load_model(ckpt)
        items = [Item(prompt=p, seed=k) for k, p in enumerate(self.prompts)]
        s = cfg.sample
        t0 = time.perf_counter()
        x = generate(model, cfg, items, sampler=s.sampler, steps=s.steps, guidance=s.guidance,
                     encoder=self.encoder, batch_size=48)  # fmt: skip
        seconds = time.perf_counter() - t0
        q = fid_kid_from_features(self.real, extract_features(x, self.feature))
        a = alignment("shapes", x, self.prompts, self.ev)
        state = read_trainer_state(ckpt)
        return {"step": int(ckpt.name.split("-")[1]), "wall": state["wall"], "fid": q["fid"],
                "all_correct": a["all_correct"], "shape_acc": a.get("shape_acc"),
                "color_acc": a.get("color_acc"), "sample_seconds": seconds}  # fmt: skip


def score_all(judge: Judge, runs: dict, out: Path) -> dict:
    """{row: {seed: [score per checkpoint, by step]}}, cached per checkpoint."""
    from attnlab.io import write_json

    scores: dict = {}
    for (row, seed), run_dir in runs.items():
        points = []
        for ckpt in sorted((run_dir / "checkpoints").glob("step-*")):
            file = out / "scores" / slug(row) / f"seed-{seed}" / f"{ckpt.name}.json"
            if not file.is_file():
                write_json(file, judge.score(ckpt))
                print(f"scored {row} seed {seed} {ckpt.name}", flush=True)
            points.append(json.loads(file.read_text()))
        scores.setdefault(row, {})[seed] = points
    return scores


# Report


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (inf for one value)."""
    from attnlab.poc.metrics import t_quantile

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, math.inf
    return m, t_quantile(len(values)) * statistics.stdev(values) / math.sqrt(len(values))


def _pm(m: float, h: float, fmt: str) -> str:
    return f"{m:{fmt}}" + ("" if math.isinf(h) else f" ± {h:{fmt}}")


def row_summary(points_by_seed: dict) -> dict:
    finals = [pts[-1] for pts in points_by_seed.values() if pts]
    return {
        "seeds": sorted(points_by_seed),
        "steps": statistics.fmean(p["step"] for p in finals),
        "minutes": statistics.fmean(p["wall"] for p in finals) / 60,
        "all_correct": interval([p["all_correct"] for p in finals]),
        "fid": interval([p["fid"] for p in finals]),
        "per_seed": {
            s: {"all_correct": pts[-1]["all_correct"], "fid": pts[-1]["fid"]}
            for s, pts in points_by_seed.items()
        },  # fmt: skip
    }


def model_cost(row: str, rows: dict) -> dict:
    from attnlab.conditioning import Condition
    from attnlab.evaluate.cost import count_parameters, denoiser_flops
    from attnlab.models import build_model

    cfg = run_config(row, rows, 0)
    model = build_model(cfg.model)
    L = 12
    cond = Condition(tokens=torch.zeros(1, L, cfg.model.context_dim), mask=torch.ones(1, L, dtype=torch.bool))
    return {
        "params": count_parameters(model),
        "flops": denoiser_flops(model, cfg.model.sample_shape(1)[1:], cond),
    }


def compare(a: dict, b: dict, key: str) -> tuple[float, float]:
    """a - b on `key` with the half-width of its 95% interval (independent training seeds)."""
    (ma, ha), (mb, hb) = a[key], b[key]
    return ma - mb, math.hypot(ha, hb)


def _said(key: str, v: float) -> str:
    return f"{100 * v:.1f} points" if key == "all_correct" else f"{v:.1f}"


def verdict(summary: dict, main: list[str]) -> list[str]:
    """The reference against the best diffusers row per metric, then the gap split into recipe
    (same architecture, the two recipes) and architecture (same recipe, the two models)."""
    ref = summary[REFERENCE]
    others = [r for r in main if r != REFERENCE]
    lines = []
    for key, name in (("all_correct", "all asked right"), ("fid", "FID")):
        sign = 1 if key == "all_correct" else -1  # higher is better / lower is better
        best = max(others, key=lambda r: sign * summary[r][key][0])
        diff, half = compare(ref, summary[best], key)
        gain = sign * diff
        if math.isinf(half):
            lines.append(f"- {name}: one training seed, no interval: too weak to call.")
        elif abs(diff) <= half:
            lines.append(f"- {name}: the reference is level with the best diffusers row ({best}): "
                         f"difference {_said(key, abs(diff))}, within the interval ±{_said(key, half)}.")  # fmt: skip
        elif gain > 0:
            lines.append(f"- {name}: the reference beats the best diffusers row ({best}) by "
                         f"{_said(key, abs(diff))} (interval ±{_said(key, half)}).")  # fmt: skip
        else:
            lines.append(f"- {name}: the reference falls short of {best} by {_said(key, abs(diff))} "
                         f"(interval ±{_said(key, half)}).")  # fmt: skip
    d_unet, d_ours = (r for r in others)
    for key, name in (("all_correct", "all asked right"), ("fid", "FID")):
        rec, h_rec = compare(summary[d_ours], summary[d_unet], key)
        arch, h_arch = compare(ref, summary[d_ours], key)
        lines.append(f"- {name}, where the differences come from: recipe (attnlab's minus diffusers' on "
                     f"UNet2DConditionModel) {rec:+.3g} ± {h_rec:.3g}; architecture at attnlab's recipe "
                     f"(reference minus UNet2DConditionModel) {arch:+.3g} ± {h_arch:.3g}.")  # fmt: skip
    return lines


def figure(scores: dict, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attnlab.train.log import read_log

    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (row, by_seed) in enumerate(scores.items()):
        c = colours[i % len(colours)]
        for j, pts in enumerate(by_seed.values()):
            label = row if j == 0 else None
            log = read_log(Path(pts[0]["run_dir"]) / "log.jsonl") if pts and "run_dir" in pts[0] else []
            if log:
                axes[0].plot([r["wall"] / 60 for r in log], [r["loss"] for r in log], color=c, alpha=0.6,
                             lw=0.8, label=label)  # fmt: skip
            minutes = [p["wall"] / 60 for p in pts]
            axes[1].plot(
                minutes, [100 * p["all_correct"] for p in pts], "o-", color=c, alpha=0.7, label=label
            )
            axes[2].plot(minutes, [p["fid"] for p in pts], "o-", color=c, alpha=0.7, label=label)
    axes[0].set(title="training loss (each recipe's own objective)", xlabel="training minutes", yscale="log")
    axes[1].set(title="all asked right (%)", xlabel="training minutes", ylim=(-2, 102))
    axes[2].set(title="evaluator FID", xlabel="training minutes", yscale="log")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, file)
    plt.close(fig)


def report(scores: dict, rows: dict, main: list[str], budget: dict, args) -> str:
    summary = {r: row_summary(scores[r]) for r in scores}
    lines = [
        "# attnlab's reference against diffusers' UNet2DConditionModel and recipe",
        "",
        f"Setting: `{CONFIG.name}` (32 px one-object shapes, MiniLM tokens, batch 32), {args.minutes} "
        f"single-threaded CPU minutes of training per run, {args.processes} runs at a time on this machine's "
        f"{os.cpu_count()} cores; training seeds {args.seeds}; judged on {args.num} eval prompts (DDIM 20 "
        "steps, guidance 1.5) by the shapes evaluator; ± is the 95% Student-t interval over training seeds.",
        "",
        "| model and recipe | parameters | MFLOP/call | steps | train min (wall, under load) | all asked right | evaluator FID | per seed (right, FID) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in scores:
        s, cost = summary[r], model_cost(r, rows)
        per = "; ".join(f"{100 * v['all_correct']:.0f}%, {v['fid']:.0f}" for v in s["per_seed"].values())
        tag = "" if r in main else " *(deviation)*"
        lines.append(
            f"| {r}{tag} | {cost['params'] / 1e6:.2f}M | {cost['flops'] / 1e6:.0f} | {s['steps']:.0f} | "
            f"{s['minutes']:.1f} | {_pm(100 * s['all_correct'][0], 100 * s['all_correct'][1], '.1f')}% | "
            f"{_pm(s['fid'][0], s['fid'][1], '.1f')} | {per} |"
        )
    lines += ["", "CPU seconds per training step (single-threaded, median of the calibration rounds):", ""]
    lines += [f"- {r}: {budget[r]['seconds_per_step']:.3f} s -> {budget[r]['steps']} steps" for r in scores]
    lines += ["", "## Verdict", "", *verdict(summary, main), ""]
    return "\n".join(lines)


def main() -> None:
    a = parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = dict(ROWS)
    main_rows = list(ROWS)
    if a.ablations:
        rows.update(ABLATIONS)
    budget = calibrate(rows, a.minutes, out)
    log_every = run_config(REFERENCE, rows, 0).train.log_every
    runs, jobs = {}, []
    for r in rows:
        seeds = a.seeds if r in main_rows else a.seeds[:1]
        steps = budget[r]["steps"]
        every = checkpoint_every(steps, a.points, log_every)
        for s in seeds:
            run_dir = out / "runs" / slug(r) / f"seed-{s}"
            runs[(r, s)] = run_dir
            jobs.append((r, rows, s, steps, every, str(run_dir)))
    train_all(jobs, a.processes)
    torch.set_num_threads(a.threads)
    scores = score_all(Judge(a.num), runs, out)
    for (r, s), run_dir in runs.items():
        for p in scores[r][s]:
            p["run_dir"] = str(run_dir)
    from attnlab.io import write_json, write_text

    md = report(scores, rows, main_rows, budget, a)
    write_json(out / "peer_recipe.json", {"args": vars(a), "budget": budget, "scores": scores})
    write_text(out / "peer_recipe.md", md)
    figure(scores, out / "peer_recipe.png")
    if a.results:
        write_text(
            Path(a.results) / "peer_recipe-shapes32.md", md + "\n![curves](peer_recipe-shapes32.png)\n"
        )
        figure(scores, Path(a.results) / "peer_recipe-shapes32.png")
    print(md)


if __name__ == "__main__":
    main()
