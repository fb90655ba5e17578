"""Recipes for evaluators: which data each built-in evaluator learns from, and the folder recipe.

`train_builtin(name)` trains the evaluator shipped for a built-in dataset (scripts/train_evaluators.py
runs it for all three and writes attnlab/evaluate/weights/); `train_folder(root, ...)` trains one for
a user's folder dataset (`attnlab evaluator train`). Each returns the Evaluator with its held-out
accuracies recorded in `info["metrics"]`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace

import torch

from attnlab.data import DataConfig, build_dataset
from attnlab.data.config import COLORS, SHAPES
from attnlab.evaluate.alignment import alignment
from attnlab.evaluate.evaluator import Evaluator, round_to_stored
from attnlab.evaluate.network import EvaluatorNet
from attnlab.evaluate.prompts import request_from_item
from attnlab.evaluate.tasks import ClassesTask, PretextTask, ShapesTask, TonesTask
from attnlab.evaluate.tasks.base import Task
from attnlab.evaluate.train import Group, TrainSettings, make_group, train_network

Log = Callable[[str], None]


def builtin_data(name: str, num: int) -> list[DataConfig]:
    """The data configs a built-in evaluator trains on (and is checked on, with their eval splits).

    shapes covers every layout the data room draws: all shapes and colours, 1-4 objects, with and
    without position captions, at 16, 32 and 64 px. tones covers 1-2 notes at several lengths.
    """
    if name == "shapes":
        return [
            DataConfig(
                name="shapes",
                size=s,
                num=num,
                min_objects=1,
                max_objects=4,
                positions=p,
                shapes=SHAPES,
                colors=COLORS,
            )
            for s in (16, 32, 64)
            for p in (True, False)
        ]
    if name == "digits":
        return [DataConfig(name="digits", size=s) for s in (16, 32)]
    if name == "tones":
        return [DataConfig(name="tones", size=s, num=num, max_notes=2) for s in (1024, 2048, 4096, 8000)]
    raise ValueError(f"no built-in evaluator recipe for {name!r}")


def _task(name: str, ds) -> Task:
    if name == "shapes":
        return ShapesTask()
    if name == "tones":
        return TonesTask(sample_rate=ds.sample_rate)
    if ds.class_names:
        return ClassesTask({"label": list(ds.class_names)})
    return PretextTask()


def _items(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


def _groups(net: EvaluatorNet, task: Task, datasets: list) -> list[Group]:
    return [make_group(net, task, _items(ds), ds.tensors()) for ds in datasets]


def check(evaluator: Evaluator, dataset_name: str, ds) -> dict:
    """Alignment of an evaluator on a real split: how often it reads the ground truth right."""
    if evaluator.task.kind == "pretext":
        return {}
    requests = [request_from_item(dataset_name, ds[i]) for i in range(len(ds))]
    return alignment(dataset_name, ds.tensors(), requests, evaluator)


def _fit(
    name: str, task: Task, train_sets: list, eval_sets: list, settings: TrainSettings, info: dict, log: Log
) -> Evaluator:
    torch.manual_seed(settings.seed)
    first = train_sets[0]
    dims = 1 if first.modality == "audio" else 2
    net = EvaluatorNet(task.network(dims, int(first.tensors().shape[1])))
    log(
        f"{name}: {sum(p.numel() for p in net.parameters())} parameters, {sum(len(d) for d in train_sets)} samples"
    )
    groups = _groups(net, task, train_sets)
    stats = train_network(net, task, groups, settings, log)
    net.calibrate_texture([g.x[i : i + 256] for g in groups for i in range(0, len(g.x), 256)])
    round_to_stored(net)
    evaluator = Evaluator(task, net, {**info, "training": {**asdict(settings), **stats}})
    dataset_name = name if name in ("shapes", "tones", "digits") else "folder"
    metrics = {}
    for ds in eval_sets:
        key = f"{ds.cfg.name}-{ds.cfg.size}" + ("-positions" if getattr(ds.cfg, "positions", False) else "")
        # nan (nothing of that kind to score) is stored as null: the JSON stays standard.
        metrics[key] = {k: None if v != v else v for k, v in check(evaluator, dataset_name, ds).items()}
        log(f"{name}: eval {key}: {metrics[key]}")
    evaluator.info["metrics"] = metrics
    return evaluator


def train_builtin(name: str, settings: TrainSettings, num: int = 3000, log: Log = print) -> Evaluator:
    """Train the shipped evaluator of a built-in dataset ("shapes", "digits" or "tones")."""
    configs = builtin_data(name, num)
    train_sets = [build_dataset(c, "train") for c in configs]
    eval_sets = [build_dataset(c, "eval") for c in configs]
    info = {
        "name": name,
        "modality": train_sets[0].modality,
        "sample_rate": train_sets[0].sample_rate,
        "trained_on": [asdict(c) for c in configs],
    }
    return _fit(name, _task(name, train_sets[0]), train_sets, eval_sets, settings, info, log)


def train_folder(cfg: DataConfig, settings: TrainSettings, log: Log = print) -> Evaluator:
    """Train an evaluator for a folder dataset: a class head if it has labels, else a pretext task."""
    cfg = replace(cfg, name="folder")
    train_set, eval_set = build_dataset(cfg, "train"), build_dataset(cfg, "eval")
    info = {
        "name": f"folder:{cfg.root}",
        "modality": train_set.modality,
        "sample_rate": train_set.sample_rate,
        "trained_on": [asdict(cfg)],
    }
    return _fit("folder", _task("folder", train_set), [train_set], [eval_set], settings, info, log)
