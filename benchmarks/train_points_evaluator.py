"""Train the shipped point evaluator (attnlab/evaluate/weights/points.*) on the built-in `points`
data and measure it on real eval clouds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_points_evaluator.py

Sizes: 6,000 train clouds and 1,000 eval clouds of 512 points, one or two solids, data seed 0;
800 steps of batch 64. The JSON beside the weights records them and the eval accuracies.
"""

from __future__ import annotations

import time

import torch

from attnlab.data import build_dataset
from attnlab.data.config import DataConfig
from attnlab.evaluate.pointcloud import alignment, save_point_evaluator, targets, train_point_evaluator

SIZES = dict(size=512, num=6000, num_eval=1000, min_objects=1, max_objects=2, seed=0)
STEPS = 800


def main() -> None:
    torch.set_num_threads(1)
    cfg = DataConfig(name="points", **SIZES)
    train, ev = build_dataset(cfg, "train"), build_dataset(cfg, "eval")
    start = time.process_time()
    model = train_point_evaluator(train.tensors(), targets(train.texts()), steps=STEPS)
    cpu = time.process_time() - start
    scores = alignment(model.predict(ev.tensors()), targets(ev.texts()))
    print({k: round(v, 4) for k, v in scores.items()}, f"{cpu:.0f} CPU-s")
    save_point_evaluator(
        model,
        {
            "name": "points",
            "modality": "points",
            "trained_on": {"dataset": "points", **SIZES, "steps": STEPS, "batch_size": 64},
            "metrics": {"eval": scores, "eval_clouds": SIZES["num_eval"]},
            "cpu_seconds": round(cpu),
        },
    )


if __name__ == "__main__":
    main()
