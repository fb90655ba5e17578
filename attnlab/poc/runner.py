"""Running a PoC: train each distinct architecture once, sample every variant with the same seeds and
prompts, evaluate quality, alignment and cost, and write the report. Every finished stage is kept,
so an interrupted run (Ctrl-C, a kill) resumes where it stopped and a finished one redoes nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from attnlab.errors import AttnlabError
from attnlab.io import remove_temporaries, write_text
from attnlab.poc.config import PocConfig, VariantConfig
from attnlab.poc.progress import Progress
from attnlab.poc.prompts import PromptSet, draw, drawn, poc_prompts
from attnlab.poc.results import metric_stats
from attnlab.poc.sampling import (
    OBJECT_WORDS,
    VariantSampler,
    items_for,
    load_samples,
    sample_fingerprint,
    sample_stage,
    sampling_settings,
)
from attnlab.poc.scoring import (
    COST_SAMPLES,
    cost_stage,
    evaluate_stage,
    evaluator_fingerprint,
    localisation_stage,
    real_features,
)
from attnlab.poc.stages import done, fingerprint, variant_dirs
from attnlab.poc.training import (
    budget_steps,
    learning_fingerprint,
    run_config,
    train_processes,
    train_side_by_side,
    train_stage,
    without_fp32,
)
from attnlab.poc.variants import model_owner, own_levels, sampling_spec, variant_model


@dataclass
class Resources:
    """What every stage shares, built on first use (a rerun with nothing left to do builds little)."""

    cfg: PocConfig
    out: Path
    models: dict = field(default_factory=dict)

    @cached_property
    def splits(self) -> dict:
        """Both splits, built together: a bad file in either stops the PoC before any training."""
        from attnlab.data import build_splits

        return build_splits(self.cfg.data, ("train", "eval"))

    @cached_property
    def eval_ds(self):
        return self.splits["eval"]

    @cached_property
    def train_ds(self):
        return self.splits["train"]

    @cached_property
    def encoder(self):
        if self.cfg.model.cond != "text":
            return None
        from attnlab.conditioning.text import get_text_encoder

        return get_text_encoder()

    @cached_property
    def train_data(self):
        from attnlab.train.batches import prepare_training_data

        return prepare_training_data(self.train_ds, self.cfg.model.cond, self.encoder)

    @cached_property
    def evaluator(self):
        from attnlab.evaluate import Evaluator

        return Evaluator.load(self.cfg.evaluator or self.cfg.data.name)

    @cached_property
    def real_fp(self) -> str:
        """What FID/KID compare against: this evaluator's features of this eval split."""
        return fingerprint("real", evaluator_fingerprint(self.evaluator), dataclasses.asdict(self.cfg.data))

    @cached_property
    def real(self):
        return real_features(self.evaluator, self.eval_ds.tensors(), self.out, self.real_fp)

    @cached_property
    def prompts(self) -> PromptSet:
        return poc_prompts(self.cfg, self.eval_ds)

    def run_config(self, owner: VariantConfig, steps: int | None = None):
        ds, enc = self.train_ds, self.encoder
        steps = steps if steps is not None else (self.cfg.budget.train_steps or 1)
        return run_config(self.cfg, owner, self.train_data, ds.num_classes, enc.dim if enc else None, steps)

    def model(self, owner: str, ckpt: Path, ema: bool):
        from attnlab.train import load_model

        if owner not in self.models:
            self.models.clear()  # one model in memory at a time
            self.models[owner] = load_model(ckpt, ema=ema)[0]
        return self.models[owner]


def run_poc(
    cfg: PocConfig, out: str | Path, *, progress: bool = True, echo: Callable[[str], None] | None = None
) -> dict:
    """Run (or resume) a proof of concept and write its report.

    Args:
        cfg: the PoC config (see `load_poc_config`).
        out: the PoC directory: variants/, figures/, report.md, report.html, results.json, results.csv.
        progress: show the progress display.
        echo: where stage lines go (default: the progress display).
    Returns:
        The results (what results.json holds).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out)  # a killed run's half-written files; finished stages are whole files
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _write_config(out / "poc.json", cfg)
    res = Resources(cfg, out)
    if _evaluates(cfg):
        res.evaluator  # noqa: B018  (a missing evaluator fails now, not after training)
    res.splits  # noqa: B018  (so does a bad file in the eval split)
    owners = _owners(cfg)
    per_variant = (1 + _evaluates(cfg) + ("localisation" in cfg.metrics)) * len(cfg.seeds) + (
        "cost" in cfg.metrics
    )
    bar = Progress(
        len(owners) + per_variant * len(cfg.variants) + 2 + _evaluates(cfg), enabled=progress, echo=echo
    )
    try:
        return _run(res, owners, bar)
    finally:
        bar.close()  # also on Ctrl-C, so the message after it starts on a clean line


def _run(res: Resources, owners: list[VariantConfig], bar: Progress) -> dict:
    cfg, out, start = res.cfg, res.out, time.perf_counter()
    trained = _train_all(res, owners, bar)
    entries = [_variant(res, v, trained, bar) for v in cfg.variants]
    heat = _heatmaps(res, trained, bar)
    floor = _floor(res, bar) if _evaluates(cfg) else None
    from attnlab.poc.report import write_report

    with bar.stage("report", "write report.md, report.html, results.json, results.csv") as st:
        results = write_report(cfg, out, entries, res.prompts, heat, floor, time.perf_counter() - start)
        st.skipped = results.pop("skipped")
    return results


def _write_config(path: Path, cfg: PocConfig) -> None:
    """The resolved config beside the results (left as it is when unchanged)."""
    text = json.dumps(cfg.to_dict(), indent=2) + "\n"
    if not path.is_file() or path.read_text() != text:
        write_text(path, text)


def _evaluates(cfg: PocConfig) -> bool:
    """Whether any metric needs the evaluator (a cost-only PoC needs none)."""
    return bool({"fid", "kid", "alignment"} & set(cfg.metrics))


def _evaluated(cfg: PocConfig) -> list[str]:
    """The metrics an evaluation stage computes (adding cost or localisation redoes none of them)."""
    return sorted({"fid", "kid", "alignment"} & set(cfg.metrics))


def _localised(rc) -> dict:
    """What heat-map IoU reads of the sampling settings: the sampler and its steps (no guidance)."""
    return {"sampler": rc.sample.sampler, "steps": rc.sample.steps}


def _cost_prompts(res: Resources) -> list:
    """The conditions the cost stage draws (the first COST_SAMPLES prompts of seed 0)."""
    p = res.prompts
    return [p.texts[:COST_SAMPLES], p.labels[:COST_SAMPLES]]


def _owners(cfg: PocConfig) -> list[VariantConfig]:
    seen: dict[str, VariantConfig] = {}
    for v in cfg.variants:
        o = model_owner(cfg, v)
        seen.setdefault(o.name, o)
    return list(seen.values())


# Stages


@dataclass
class Trained:
    rc: object
    record: dict
    model_fp: str


def _train_all(res: Resources, owners: list[VariantConfig], bar: Progress) -> dict[str, Trained]:
    """Train every model owner; on a CPU several at once, each in its own single-threaded process."""
    cfg, rcs = res.cfg, {}
    cores = cfg.threads or os.cpu_count() or 1
    at_once = train_processes(cfg.budget.train_processes, len(owners), cfg.threads)
    each = max(1, cores // at_once)
    sharing = (each, max(1.0, at_once * each / cores)) if at_once > 1 else (0, 1.0)
    for o in owners:
        steps = cfg.budget.train_steps
        if steps is None:
            dirs = variant_dirs(res.out, o.name)
            steps = budget_steps(cfg, res.run_config(o, 1), res.train_data, dirs, sharing)
        rcs[o.name] = res.run_config(o, steps)
    pending = [
        o.name
        for o in owners
        if done(variant_dirs(res.out, o.name).marker("trained"), learning_fingerprint(rcs[o.name])) is None
    ]
    fit = {name: _resumable(rcs[name], variant_dirs(res.out, name)) for name in pending}
    n = train_processes(cfg.budget.train_processes, len(pending), cfg.threads)
    if n > 1:
        threads = max(1, cores // n)
        bar.echo(f"training {', '.join(pending)} side by side: {n} processes of {threads} thread(s)")
        jobs = [(fit[name], variant_dirs(res.out, name)) for name in pending]
        train_side_by_side(jobs, res.train_data, n, threads)
    fresh = set(pending) if n > 1 else set()
    return {o.name: _train(res, o, rcs[o.name], fit.get(o.name), o.name in fresh, bar) for o in owners}


def _resumable(rc, dirs) -> object:
    """The config to train `dirs.model` with. A run left there for other data, another model or other
    training options is the stale stage's: it is removed and training starts afresh. One that differs
    only in steps, presentation or sampling settings resumes, keeping its sampling settings (the
    trainer refuses any other config in its directory; training never reads them)."""
    from attnlab.train.checkpoint import latest_checkpoint, read_config

    found = latest_checkpoint(dirs.model)
    if found is None:
        return rc
    try:
        old = read_config(found)
    except AttnlabError:
        old = None
    if old is None or _resume_fingerprint(old) != _resume_fingerprint(rc):
        shutil.rmtree(dirs.model)
        return rc
    return dataclasses.replace(rc, sample=old.sample)


def _resume_fingerprint(rc) -> str:
    """What a run must share with the one in its directory to resume it."""
    from attnlab.train.trainer import RESUMABLE_CHANGES

    d = rc.to_dict()
    train = {k: v for k, v in d["train"].items() if k not in RESUMABLE_CHANGES}
    return fingerprint("resume", without_fp32({**d, "train": train, "sample": None}, "train"))


def _train(res: Resources, owner: VariantConfig, rc, fit, fresh: bool, bar: Progress) -> Trained:
    """One owner's training stage (`fresh`: trained just now in a side-by-side process; `fit`: the
    config it trains with when its stage is due, see `_resumable`)."""
    dirs = variant_dirs(res.out, owner.name)
    with bar.stage(owner.name, "train") as st:
        record = train_stage(fit or rc, dirs, res.train_data)
        st.skipped = record["skipped"] and not fresh
        st.detail = f"{record['steps']} steps, {record['train_seconds'] / 60:.1f} min of training"
        if record.get("side_by_side", 1) > 1:
            st.detail += f", {record['side_by_side']} models at once"
    ema = res.cfg.sample.ema and res.cfg.train.ema_decay > 0
    return Trained(rc, record, fingerprint("model", learning_fingerprint(rc), ema))


def _sampler(res: Resources, v: VariantConfig, t: Trained) -> _LazySampler:
    """How variant `v` draws samples: its owner's trained model with its sampling-time techniques."""
    cfg = res.cfg
    owner = model_owner(cfg, v).name
    ema = cfg.sample.ema and cfg.train.ema_decay > 0
    model = _LazyModel(res, owner, variant_dirs(res.out, owner).root / t.record["checkpoint"], ema)
    words = cfg.excite_words or OBJECT_WORDS.get(cfg.data.name, ())
    return _LazySampler(model, t.rc, sampling_spec(cfg, v), res, words)


def _variant(res: Resources, v: VariantConfig, trained: dict[str, Trained], bar: Progress) -> dict:
    cfg = res.cfg
    owner = model_owner(cfg, v)
    t = trained[owner.name]
    sampler = _sampler(res, v, t)
    per_seed, sampled = {}, {}
    for seed in cfg.seeds:
        sampled[seed], per_seed[seed] = _seed(res, v, t, sampler, seed, bar)
    cost = {}
    if "cost" in cfg.metrics:
        with bar.stage(v.name, "cost") as st:
            fp = fingerprint("cost", t.model_fp, sampler.spec, sampling_settings(t.rc), _cost_prompts(res))
            cost = cost_stage(
                sampler,
                res.prompts,
                variant_dirs(res.out, owner.name).model,
                variant_dirs(res.out, v.name),
                fp,
            )
            st.skipped = cost["skipped"]
    return _entry(cfg, v, owner, sampler.spec, per_seed, cost, t, sampled)


def _seed(
    res: Resources, v: VariantConfig, t: Trained, sampler, seed: int, bar: Progress
) -> tuple[dict, dict]:
    """Sample and evaluate one seed of one variant; returns (sampling record, scores)."""
    cfg, dirs = res.cfg, variant_dirs(res.out, v.name)
    ema = cfg.sample.ema and cfg.train.ema_decay > 0
    fp = sample_fingerprint(t.model_fp, sampler.spec, t.rc, res.prompts, seed, ema)
    with bar.stage(v.name, f"sample seed {seed}") as st:
        rec = sample_stage(sampler, dirs, res.prompts, seed, fp, cfg.budget.batch_size)
        st.skipped, st.detail = rec["skipped"], f"{rec['latency_s'] * 1000:.0f} ms per sample"
    scores = {"latency_s": rec["latency_s"]}
    if _evaluates(cfg):
        with bar.stage(v.name, f"evaluate seed {seed}") as st:
            efp = fingerprint("evaluate", fp, res.real_fp, _evaluated(cfg))
            found = evaluate_stage(
                lambda: load_samples(dirs, seed),
                dataset=cfg.data.name,
                metrics=cfg.metrics,
                requests=lambda: res.prompts.requests,
                ev=res.evaluator,
                real=lambda: res.real,
                marker=dirs.marker(f"evaluated-{seed}"),
                fp=efp,
            )
            st.skipped = found["skipped"]
        scores.update(found["scores"])
    if "localisation" in cfg.metrics:
        with bar.stage(v.name, f"heat-map IoU seed {seed}") as st:
            n = cfg.budget.num_samples
            lfp = fingerprint("localisation", t.model_fp, sampler.spec, _localised(t.rc), seed, n)
            loc = localisation_stage(sampler, res.eval_ds, n, seed, dirs.marker(f"localised-{seed}"), lfp)
            st.skipped = loc["skipped"]
        scores.update(loc["scores"])
    return rec, scores


def _floor(res: Resources, bar: Progress) -> dict:
    """Real training data scored like a variant, seed by seed: what a perfect model would score with
    this many samples (FID of few samples is far from 0), and how often the evaluator reads truth right."""
    cfg, n = res.cfg, res.cfg.budget.num_samples
    per_seed = {}
    with bar.stage("real data", "evaluate (what a perfect model would score)") as st:
        for seed in cfg.seeds:
            idx = lambda seed=seed: draw(len(res.train_ds), n, cfg.data.seed, 11, seed)  # noqa: E731
            rec = evaluate_stage(
                lambda idx=idx: res.train_ds.tensors()[idx()],
                dataset=cfg.data.name,
                metrics=cfg.metrics,
                requests=lambda idx=idx: drawn(cfg, res.train_ds, idx()).requests,
                ev=res.evaluator,
                real=lambda: res.real,
                marker=res.out / "stages" / f"real-data-{seed}.json",
                fp=fingerprint("real data", res.real_fp, _evaluated(cfg), cfg.model.cond, n, seed),
            )
            st.skipped = rec["skipped"]
            per_seed[seed] = rec["scores"]
    return {"name": "real data", "metrics": {k: s.to_dict() for k, s in metric_stats(per_seed, {}).items()}}


def _heatmaps(res: Resources, trained: dict[str, Trained], bar: Progress) -> list[dict]:
    """Heat maps of every variant that has them, else of the reference model when the config asks."""
    cfg = res.cfg
    names = [v.name for v in cfg.variants if "heatmaps" in sampling_spec(cfg, v)]
    if not names and cfg.heatmaps:
        names = [cfg.reference_name]
    if cfg.model.cond != "text" or not names:
        bar.skip(
            "heat maps (" + ("the model reads no text)" if cfg.model.cond != "text" else "none asked for)")
        )
        return []
    from attnlab.poc.heatmaps import heatmap_stage

    out = []
    with bar.stage(", ".join(names), "heat maps") as st:
        for name in names:
            v = cfg.variant(name)
            t = trained[model_owner(cfg, v).name]
            sampler = _sampler(res, v, t)
            prompt = res.prompts.texts[0]
            seed = items_for(res.prompts, cfg.seeds[0])[0].seed
            dirs = variant_dirs(res.out, name)
            fp = fingerprint("heatmaps", t.model_fp, sampler.spec, sampling_settings(t.rc), prompt, seed)
            rec = heatmap_stage(sampler, prompt, seed, dirs, fp, cfg.data.sample_rate)
            st.skipped = rec["skipped"]
            out.append({"variant": name, **rec, "path": str(dirs.root / rec["file"])})
    return out


def _entry(
    cfg: PocConfig,
    v: VariantConfig,
    owner: VariantConfig,
    spec: dict,
    per_seed: dict,
    cost: dict,
    t: Trained,
    sampled: dict,
) -> dict:
    levels = own_levels(cfg, v)
    cost = {k: val for k, val in cost.items() if k not in ("fingerprint", "skipped")}
    train = {k: val for k, val in t.record.items() if k not in ("fingerprint", "skipped")}
    return {
        "name": v.name,
        "group": max(levels) if levels else 0,
        "levels": levels,
        "techniques": {n: dict(o or {}) for n, o in v.techniques.items()},
        "sampling": spec,
        "model": {"techniques": variant_model(cfg, v).techniques, "changes": dict(v.model)},
        "base": v.base,
        "trained_by": owner.name,
        "note": v.note,
        "metrics": {k: s.to_dict() for k, s in metric_stats(per_seed, cost).items()},
        "per_seed": {str(s): scores for s, scores in per_seed.items()},
        "cost": cost,
        "train": train,
        "samples": {str(s): r["file"] for s, r in sampled.items()},
        "sampling_seconds": sum(r["seconds"] for r in sampled.values()),
    }


# A rerun that finds every stage done should not load models or encoders it will not use.


class _LazyModel:
    def __init__(self, res: Resources, owner: str, ckpt: Path, ema: bool):
        self.args = (owner, ckpt, ema)
        self.res = res

    def get(self):
        return self.res.model(*self.args)


class _LazySampler:
    """A VariantSampler built on first use."""

    def __init__(self, model: _LazyModel, rc, spec: dict, res: Resources, excite_words):
        self._args = (model, rc, spec, res, tuple(excite_words))
        self._built: VariantSampler | None = None
        self.rc, self.spec = rc, spec

    def _get(self) -> VariantSampler:
        if self._built is None:
            model, rc, spec, res, words = self._args
            self._built = VariantSampler(model.get(), rc, spec, res.encoder, words)
        return self._built

    def __getattr__(self, name):
        return getattr(self._get(), name)
