"""Stage markers: each finished piece of PoC work leaves a small JSON file naming what it was done for,
so a rerun skips it, and redoes it only when its inputs changed.

A marker holds a fingerprint (a hash of the stage's inputs, including the fingerprints of the stages
it builds on) and the stage's results. It is written atomically and only after the stage's other
files are in place, so a run killed at any point leaves either a complete stage or none.

    DIR/poc.json                              the resolved config
    DIR/variants/NAME/model/                  the training run (checkpoints/, log.jsonl) of a trained variant
    DIR/variants/NAME/samples/seed-S.safetensors   the samples of sampling seed S
    DIR/variants/NAME/stages/<stage>.json     trained, budget, sampled-S, evaluated-S, cost, heatmaps

With several training seeds each variant keeps the model, samples and stages of training seed T in
DIR/variants/NAME/train-seed-T/ instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnlab.io import write_json


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class VariantDirs:
    """Where one variant's files live."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    def samples_file(self, seed: int) -> Path:
        return self.samples / f"seed-{seed}.safetensors"

    def marker(self, stage: str) -> Path:
        return self.stages / f"{stage}.json"


def variant_dirs(out: str | Path, name: str, train_seed: int | None = None) -> VariantDirs:
    """A variant's directory; with several training seeds, one per seed inside it."""
    root = Path(out) / "variants" / name
    return VariantDirs(root if train_seed is None else root / f"train-seed-{train_seed}")


def seed_dirs(out: str | Path, name: str, train_seeds: list[int], train_seed: int) -> VariantDirs:
    """Where variant `name` keeps the work of `train_seed`: variants/NAME/ when the PoC has one
    training seed (the layout of every single-seed run), else variants/NAME/train-seed-T/."""
    return variant_dirs(out, name, train_seed if len(train_seeds) > 1 else None)


def done(path: Path, fp: str) -> dict | None:
    """The record of a finished stage whose fingerprint is `fp`, or None (missing, unreadable or stale)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("fingerprint") == fp else None


def mark(path: Path, fp: str, record: dict) -> dict:
    """Record a finished stage (atomically); returns the record."""
    record = {"fingerprint": fp, **record}
    write_json(path, record)
    return record


def run_stage(marker: Path, fp: str, work: Callable[[], dict], *, files: Iterable[Path] = ()) -> dict:
    """The stage's record with "skipped": True when `marker` holds fingerprint `fp` and its `files`
    are there; else run `work` (which writes those files and returns the record), mark the stage
    done, and return its record with "skipped": False."""
    record = done(marker, fp)
    if record is not None and all(Path(f).is_file() for f in files):
        return {**record, "skipped": True}
    return {**mark(marker, fp, work()), "skipped": False}
