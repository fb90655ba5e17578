"""Train the evaluators attnlab ships for its built-in datasets and write them to
attnlab/evaluate/weights/<name>.safetensors + <name>.json (with their held-out accuracies).

    .venv/bin/python scripts/train_evaluators.py                 # all three, about 10 minutes on 2 cores
    .venv/bin/python scripts/train_evaluators.py --only shapes   # one of them

Everything is seeded: a rerun on the same machine and library versions gives the same weights.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from attnlab.evaluate.evaluator import BUILTIN, WEIGHTS_DIR
from attnlab.evaluate.recipes import train_builtin
from attnlab.evaluate.train import TrainSettings

# Budgets per evaluator: shapes reads small multi-object scenes and needs the most steps.
SETTINGS = {
    "shapes": TrainSettings(steps=1500, batch_size=48, lr=3e-3),
    "digits": TrainSettings(steps=400, batch_size=64, lr=3e-3),
    "tones": TrainSettings(steps=1500, batch_size=32, lr=3e-3),
}
TRAIN_ITEMS = {"shapes": 2500, "digits": 0, "tones": 1500}  # per data config; digits uses all it has


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.only or BUILTIN:
        settings = SETTINGS[name] if args.steps is None else replace(SETTINGS[name], steps=args.steps)
        evaluator = train_builtin(name, settings, num=TRAIN_ITEMS[name] or 1, log=print)
        config, weights = evaluator.save(args.out / name)
        print(f"{name}: wrote {config} and {weights} ({weights.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
