"""Finished PoCs for the rating tests, each built once per test session and copied for every test
that writes votes: a tiny text-conditioned shapes PoC with two training seeds, a tiny audio PoC and
a tiny pipeline PoC; and a scripted rater."""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from poc_util import ATTN16, BASE, BUDGET, PAG, load_poc, save_untrained_evaluator, tiny_poc

from attnlab.rate.poc import Pair
from attnlab.rate.store import Ratings

NAMES = ["base", "attn16", "pag"]


def _once(root: Path, build) -> Path:
    """`build(root)` unless a finished PoC is already there (built earlier in this session)."""
    out = root / "out"
    if not (out / "results.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        build(root)
    return out


def shapes_poc(base: Path) -> Path:
    """Three variants (base, attn16 trained with attention at 16 px, pag on base's model), two
    training seeds, three sampling seeds, four prompts; FID and alignment from an untrained evaluator."""

    def build(root: Path) -> None:
        from attnlab.poc import run_poc

        ev = save_untrained_evaluator(root)
        cfg = tiny_poc(
            variants=[BASE, ATTN16, PAG],
            metrics=["fid", "kid", "alignment"],
            evaluator=str(ev),
            train_seeds=[0, 1],
            budget={**BUDGET, "train_processes": 1},
        )
        run_poc(load_poc(root, cfg), root / "out", progress=False, echo=lambda line: None)

    return _once(base / "rate-shapes", build)


def tones_poc(base: Path) -> Path:
    """An audio PoC: tones, class-conditioned, two variants."""

    def build(root: Path) -> None:
        import torch

        from attnlab.evaluate import Evaluator
        from attnlab.evaluate.network import EvaluatorNet
        from attnlab.evaluate.tasks import TonesTask
        from attnlab.poc import load_poc_config, run_poc

        torch.manual_seed(0)
        task = TonesTask()
        net = EvaluatorNet(task.network(1, 1)).eval()
        Evaluator(task, net, {"name": "untrained", "sample_rate": 8000}).save(root / "ev" / "evaluator")
        model = {
            "cond": "class",
            "width": 16,
            "channel_mult": [1, 2],
            "attn_resolutions": [512],
            "heads": 2,
            "norm_groups": 4,
        }
        cfg = tiny_poc(
            data={"name": "tones", "size": 1024, "num": 32, "num_eval": 16},
            model=model,
            variants=[{"name": "base"}, {"name": "pag", "base": "base", "techniques": {"pag": {}}}],
            evaluator=str(root / "ev"),
            metrics=["alignment"],
        )
        (root / "poc.yaml").write_text(yaml.safe_dump(cfg))
        run_poc(load_poc_config(root / "poc.yaml"), root / "out", progress=False, echo=lambda line: None)

    return _once(base / "rate-tones", build)


def pipeline_poc(base: Path) -> Path:
    """A PoC on a tiny random-weight Stable Diffusion pipeline: two training-free variants, cost only."""

    def build(root: Path) -> None:
        import diffusers_tiny as tiny

        from attnlab.poc import pipeline as pp

        tiny.sd().save_pretrained(root / "sd")
        (root / "prompts.txt").write_text("a red car\na blue cat\n")
        cfg = {
            "pipeline": "sd",
            "prompts": "prompts.txt",
            "budget": {"sample_steps": 2, "num_samples": 2, "batch_size": 2, "guidance": 5.0},
            "variants": [{"name": "reference"}, {"name": "tgate", "techniques": {"tgate": {"gate": 0.5}}}],
            "metrics": ["cost"],
            "heatmaps": False,
        }
        (root / "poc.yaml").write_text(yaml.safe_dump(cfg))
        loaded = pp.load_pipeline_poc_config(root / "poc.yaml")
        pp.run_pipeline_poc(loaded, root / "out", progress=False, echo=lambda line: None)

    return _once(base / "rate-pipeline", build)


def copy_poc(src: Path, dst: Path) -> Path:
    """A copy of a finished PoC that a test may write votes into."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("ratings.sqlite*"))
    return dst


# Raters


def scripted_votes(
    ratings: Ratings, pairs: list[Pair], strengths: dict[str, float], rater: str, seed: int = 0
) -> None:
    """Vote on `pairs` as a rater whose preferences follow Bradley-Terry `strengths` (with some ties)."""
    rng = random.Random(seed)
    for p in pairs:
        u = rng.random()
        p_left = 1 / (1 + math.exp(strengths[p.right] - strengths[p.left]))
        choice = "tie" if u < 0.1 else "left" if rng.random() < p_left else "right"
        ratings.record(rater, "quality", p, choice)


# A server in a subprocess


def start_server(poc_dir: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`attnlab rate POC_DIR --port 0` in a subprocess; returns it and the address it printed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "attnlab", "rate", str(poc_dir), "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        if line.startswith("rating page: "):
            return proc, line.split()[2].rstrip("/")
    proc.kill()
    raise RuntimeError("the server printed no address in 120 s")
