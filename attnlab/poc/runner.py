"""Running a PoC: train each distinct architecture once per training seed, sample every variant with
the same seeds and prompts from each seed's model, evaluate quality, alignment and cost, and write
the report. Every finished stage is kept,
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
from attnlab.poc.stages import VariantDirs, done, fingerprint, seed_dirs
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

        if self.cfg.data.name == "points":  # MMD, COV and 1-NNA compare with as many eval clouds
            from attnlab.evaluate.pointcloud import PointsEvaluator, load_point_evaluator

            reference = self.eval_ds.tensors()[: self.cfg.budget.num_samples]
            return PointsEvaluator(load_point_evaluator(self.cfg.evaluator or "points"), reference)
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

    def run_config(self, owner: VariantConfig, steps: int | None = None, seed: int | None = None):
        ds, enc = self.train_ds, self.encoder
        steps = steps if steps is not None else (self.cfg.budget.train_steps or 1)
        dim = enc.dim if enc else None
        return run_config(self.cfg, owner, self.train_data, ds.num_classes, dim, steps, seed)

    def dirs(self, name: str, train_seed: int) -> VariantDirs:
        """Where variant `name` keeps the work of training seed `train_seed`."""
        return seed_dirs(self.out, name, self.cfg.training_seeds, train_seed)

    def tag(self, train_seed: int) -> str:
        """How a stage line names the training seed ('' with one)."""
        return f"training seed {train_seed}, " if self.cfg.replicated else ""

    def model(self, owner: str, train_seed: int, ckpt: Path, ema: bool):
        from attnlab.train import load_model

        key = (owner, train_seed)
        if key not in self.models:
            self.models.clear()  # one model in memory at a time
            self.models[key] = load_model(ckpt, ema=ema)[0]
        return self.models[key]


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
    n_train = len(cfg.training_seeds)
    per_seed = 1 + _evaluates(cfg) + ("localisation" in cfg.metrics)
    per_variant = per_seed * len(cfg.seeds) * n_train + ("cost" in cfg.metrics)
    bar = Progress(
        len(owners) * n_train + per_variant * len(cfg.variants) + 2 + _evaluates(cfg),
        enabled=progress,
        echo=echo,
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


Key = tuple[str, int]  # (model owner, training seed)


def _train_all(res: Resources, owners: list[VariantConfig], bar: Progress) -> dict[Key, Trained]:
    """Train every model owner from every training seed; on a CPU several at once, each in its own
    single-threaded process."""
    cfg, rcs = res.cfg, {}
    seeds = cfg.training_seeds
    keys = [(o.name, t) for o in owners for t in seeds]
    cores = cfg.threads or os.cpu_count() or 1
    at_once = train_processes(cfg.budget.train_processes, len(keys), cfg.threads)
    each = max(1, cores // at_once)
    sharing = (each, max(1.0, at_once * each / cores)) if at_once > 1 else (0, 1.0)
    for o in owners:
        steps = cfg.budget.train_steps
        if steps is None:  # one step count per architecture, whatever the seed
            probe = res.run_config(o, 1, seeds[0])
            steps = budget_steps(cfg, probe, res.train_data, res.dirs(o.name, seeds[0]), sharing)
        for t in seeds:
            rcs[o.name, t] = res.run_config(o, steps, t)
    pending = [k for k in keys if done(res.dirs(*k).marker("trained"), learning_fingerprint(rcs[k])) is None]
    fit = {k: _resumable(rcs[k], res.dirs(*k)) for k in pending}
    n = train_processes(cfg.budget.train_processes, len(pending), cfg.threads)
    if n > 1:
        threads = max(1, cores // n)
        names = ", ".join(_label(res, k) for k in pending)
        bar.echo(f"training {names} side by side: {n} processes of {threads} thread(s)")
        jobs = [(fit[k], res.dirs(*k)) for k in pending]
        train_side_by_side(jobs, res.train_data, n, threads, progress=bar.enabled)
    fresh = set(pending) if n > 1 else set()
    by_name = {o.name: o for o in owners}
    return {k: _train(res, by_name[k[0]], k[1], rcs[k], fit.get(k), k in fresh, bar) for k in keys}


def _label(res: Resources, key: Key) -> str:
    """'reference', or 'reference (training seed 1)' when the PoC has several."""
    name, t = key
    return f"{name} (training seed {t})" if res.cfg.replicated else name


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


def _train(
    res: Resources, owner: VariantConfig, train_seed: int, rc, fit, fresh: bool, bar: Progress
) -> Trained:
    """One owner's training stage for one training seed (`fresh`: trained just now in a side-by-side
    process; `fit`: the config it trains with when its stage is due, see `_resumable`)."""
    dirs = res.dirs(owner.name, train_seed)
    with bar.stage(_label(res, (owner.name, train_seed)), "train") as st:
        run = fit or rc
        if not bar.enabled:  # --no-progress: the trainer's bar too ("progress" is presentation only)
            run = dataclasses.replace(run, train=dataclasses.replace(run.train, progress=False))
        record = train_stage(run, dirs, res.train_data)
        st.skipped = record["skipped"] and not fresh
        st.detail = f"{record['steps']} steps, {record['train_seconds'] / 60:.1f} min of training"
        if record.get("side_by_side", 1) > 1:
            st.detail += f", {record['side_by_side']} models at once"
    ema = res.cfg.sample.ema and res.cfg.train.ema_decay > 0
    return Trained(rc, record, fingerprint("model", learning_fingerprint(rc), ema))


def _sampler(res: Resources, v: VariantConfig, t: Trained, train_seed: int) -> _LazySampler:
    """How variant `v` draws samples: its owner's model of `train_seed` with its sampling-time techniques."""
    cfg = res.cfg
    owner = model_owner(cfg, v).name
    ema = cfg.sample.ema and cfg.train.ema_decay > 0
    ckpt = res.dirs(owner, train_seed).root / t.record["checkpoint"]
    model = _LazyModel(res, owner, train_seed, ckpt, ema)
    words = cfg.excite_words or OBJECT_WORDS.get(cfg.data.name, ())
    return _LazySampler(model, t.rc, sampling_spec(cfg, v), res, words)


def _variant(res: Resources, v: VariantConfig, trained: dict[Key, Trained], bar: Progress) -> dict:
    cfg = res.cfg
    owner = model_owner(cfg, v)
    per_train, sampled, samplers = {}, {}, {}
    for ts in cfg.training_seeds:
        t = trained[owner.name, ts]
        samplers[ts] = sampler = _sampler(res, v, t, ts)
        per_train[ts], sampled[ts] = {}, {}
        for seed in cfg.seeds:
            sampled[ts][seed], per_train[ts][seed] = _seed(res, v, t, sampler, ts, seed, bar)
    cost = {}
    if "cost" in cfg.metrics:  # the architecture's cost: counted on the first training seed's model
        first = cfg.training_seeds[0]
        t, sampler = trained[owner.name, first], samplers[first]
        with bar.stage(v.name, "cost") as st:
            fp = fingerprint("cost", t.model_fp, sampler.spec, sampling_settings(t.rc), _cost_prompts(res))
            dirs = res.dirs(owner.name, first).model, res.dirs(v.name, first)
            cost = cost_stage(sampler, res.prompts, *dirs, fp)
            st.skipped = cost["skipped"]
    records = {ts: trained[owner.name, ts].record for ts in cfg.training_seeds}
    return _entry(cfg, v, owner, samplers[cfg.training_seeds[0]].spec, per_train, cost, records, sampled)


def _seed(
    res: Resources, v: VariantConfig, t: Trained, sampler, train_seed: int, seed: int, bar: Progress
) -> tuple[dict, dict]:
    """Sample and evaluate one sampling seed of one variant on the model of `train_seed`; returns
    (sampling record, scores)."""
    cfg, dirs, tag = res.cfg, res.dirs(v.name, train_seed), res.tag(train_seed)
    ema = cfg.sample.ema and cfg.train.ema_decay > 0
    fp = sample_fingerprint(t.model_fp, sampler.spec, t.rc, res.prompts, seed, ema)
    with bar.stage(v.name, f"sample {tag}seed {seed}") as st:
        rec = sample_stage(sampler, dirs, res.prompts, seed, fp, cfg.budget.batch_size)
        st.skipped, st.detail = rec["skipped"], f"{rec['latency_s'] * 1000:.0f} ms per sample"
    scores = {"latency_s": rec["latency_s"]}
    if _evaluates(cfg):
        with bar.stage(v.name, f"evaluate {tag}seed {seed}") as st:
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
        with bar.stage(v.name, f"heat-map IoU {tag}seed {seed}") as st:
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
    stats = metric_stats({0: per_seed}, {})
    return {"name": "real data", "metrics": {k: s.to_dict() for k, s in stats.items()}}


def _heatmaps(res: Resources, trained: dict[Key, Trained], bar: Progress) -> list[dict]:
    """Heat maps of every variant that has them, else of the reference model when the config asks
    (on the first training seed's models)."""
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
            v, first = cfg.variant(name), cfg.training_seeds[0]
            t = trained[model_owner(cfg, v).name, first]
            sampler = _sampler(res, v, t, first)
            prompt = res.prompts.texts[0]
            seed = items_for(res.prompts, cfg.seeds[0])[0].seed
            dirs = res.dirs(name, first)
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
    per_train: dict[int, dict],
    cost: dict,
    records: dict[int, dict],
    sampled: dict[int, dict],
) -> dict:
    """A variant's results.json entry: per training seed its scores per sampling seed, training
    record and sample files; its metrics over all of them; its cost (training time: the mean over
    the training seeds)."""
    levels = own_levels(cfg, v)
    cost = {k: val for k, val in cost.items() if k not in ("fingerprint", "skipped")}
    train = {
        str(ts): {k: val for k, val in r.items() if k not in ("fingerprint", "skipped")}
        for ts, r in records.items()
    }
    if "train_seconds" in cost:
        cost["train_seconds"] = sum(r["train_seconds"] for r in train.values()) / len(train)
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
        "train_seeds": list(per_train),
        "metrics": {k: s.to_dict() for k, s in metric_stats(per_train, cost).items()},
        "per_train_seed": {
            str(ts): {str(s): scores for s, scores in per_seed.items()} for ts, per_seed in per_train.items()
        },
        "cost": cost,
        "train": train,
        "samples": {str(ts): {str(s): r["file"] for s, r in by.items()} for ts, by in sampled.items()},
        "sampling_seconds": sum(r["seconds"] for by in sampled.values() for r in by.values()),
    }


# A rerun that finds every stage done should not load models or encoders it will not use.


class _LazyModel:
    def __init__(self, res: Resources, owner: str, train_seed: int, ckpt: Path, ema: bool):
        self.args = (owner, train_seed, ckpt, ema)
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
