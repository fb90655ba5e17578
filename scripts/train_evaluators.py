"""Train the evaluators attnlab ships for its built-in datasets and write them to
attnlab/evaluate/weights/<name>.safetensors + <name>.json (with their held-out accuracies).

    .venv/bin/python scripts/train_evaluators.py                 # all three, about 10 minutes on 2 cores
    .venv/bin/python scripts/train_evaluators.py --only shapes   # one of them
    .venv/bin/python scripts/train_evaluators.py --check         # no training: FID/KID sanity of the shipped ones

Everything is seeded: a rerun on the same machine and library versions gives the same weights.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from attnlab.data import DataConfig, build_dataset
from attnlab.evaluate import Evaluator, fid_kid
from attnlab.evaluate.evaluator import BUILTIN, WEIGHTS_DIR
from attnlab.evaluate.recipes import train_builtin
from attnlab.evaluate.train import TrainSettings, degrade

# Budgets per evaluator: shapes reads small multi-object scenes and needs the most steps.
SETTINGS = {
    "shapes": TrainSettings(steps=1500, batch_size=48, lr=3e-3),
    "digits": TrainSettings(steps=400, batch_size=64, lr=3e-3),
    "tones": TrainSettings(steps=1500, batch_size=32, lr=3e-3),
}
TRAIN_ITEMS = {"shapes": 2500, "digits": 0, "tones": 1500}  # per data config; digits uses all it has


CHECK_SIZES = {"shapes": 32, "digits": 16, "tones": 2048}


def check(name: str, weights: Path) -> None:
    """FID/KID of the eval split against itself, the train split, degraded copies and noise."""
    feature = Evaluator.load(weights / f"{name}.json").feature_net()
    cfg = DataConfig(name=name, size=CHECK_SIZES[name], num=500, num_eval=500)
    real, train = (build_dataset(cfg, s).tensors()[:500] for s in ("eval", "train"))
    others = {
        "itself": real,
        "train split": train,
        "degraded": degrade(real, torch.Generator().manual_seed(0)),
        "noise": (torch.randn_like(real) * 0.5).clamp(-1, 1),
    }
    for label, other in others.items():
        q = fid_kid(real, other, feature)
        print(
            f"{name} eval vs {label:<11}  FID {q['fid']:10.4f}  KID {q['kid_mean']:9.5f} +- {q['kid_std']:.5f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=BUILTIN, action="append", help="train only these (repeatable)")
    parser.add_argument(
        "--out", type=Path, default=WEIGHTS_DIR, help="directory for <name>.safetensors/.json"
    )
    parser.add_argument("--steps", type=int, default=None, help="override every evaluator's step count")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 stays fast on a busy machine)"
    )
    parser.add_argument(
        "--check", action="store_true", help="no training: FID/KID sanity of the evaluators in --out"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.check:
        for name in args.only or BUILTIN:
            check(name, args.out)
        return
    for name in args.only or BUILTIN:
        settings = SETTINGS[name] if args.steps is None else replace(SETTINGS[name], steps=args.steps)
        evaluator = train_builtin(name, settings, num=TRAIN_ITEMS[name] or 1, log=print)
        config, weights = evaluator.save(args.out / name)
        print(f"{name}: wrote {config} and {weights} ({weights.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
