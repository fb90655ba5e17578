"""The floor of the point-cloud metrics: real clouds scored as if generated. 200 train clouds
against 200 eval clouds (PointFlow's protocol: as many generated as reference clouds) of the
built-in `points` data, 512 points each, one or two solids, for data seeds 0, 1 and 2:
MMD-CD, COV-CD, 1-NNA-CD, FPD (Frechet distance of the point evaluator's features, against the
whole 1,000-cloud eval split) and the evaluator's alignment with the clouds' own captions.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/points_floor.py [SEED ...]   # default: 0 1 2
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from attnlab.data import build_dataset
from attnlab.data.config import DataConfig
from attnlab.evaluate.pointcloud import (
    FeatureNet,
    alignment,
    load_point_evaluator,
    pointflow_metrics,
    targets,
)
from attnlab.evaluate.quality import extract_features, fid_kid_from_features

N, POINTS = 200, 512


def floor(seed: int, ev) -> dict:
    cfg = DataConfig(name="points", size=POINTS, num=N, num_eval=1000, max_objects=2, seed=seed)
    train, evs = build_dataset(cfg, "train"), build_dataset(cfg, "eval")
    fake, ref = train.tensors(), evs.tensors()[:N]
    out = pointflow_metrics(fake, ref)
    feats = FeatureNet(ev)
    out["fpd"] = fid_kid_from_features(extract_features(evs.tensors(), feats), extract_features(fake, feats))[
        "fid"
    ]
    out.update(alignment(ev.predict(fake), targets(train.texts())))
    return out


def main() -> None:
    torch.set_num_threads(1)
    ev, start = load_point_evaluator(), time.process_time()
    seeds = [int(a) for a in sys.argv[1:]] or [0, 1, 2]
    per_seed = {seed: floor(seed, ev) for seed in seeds}
    keys = list(per_seed[0])
    summary = {
        k: (
            float(np.mean([s[k] for s in per_seed.values()])),
            float(np.std([s[k] for s in per_seed.values()])),
        )
        for k in keys
    }
    print(
        json.dumps(
            {"per_seed": per_seed, "mean_std": summary, "cpu_s": round(time.process_time() - start)}, indent=1
        )
    )


if __name__ == "__main__":
    main()
