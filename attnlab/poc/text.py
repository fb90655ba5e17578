"""The text PoC (`modality: tokens`): one base text run, a reference and one design per level,
each trained once per training seed (a training-free design samples each seed's reference model),
sampled on the eval split's conditions and scored; `report.md` and `results.json` with the table
(mean over training seeds, and each design's 95% t interval of its paired difference from the
reference), the metric floors (the eval text itself), samples side by side, and heat maps of the
generated tokens on the condition tokens. Finished runs and scored variants are skipped on a rerun.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnlab.configio import build_structured, config_layers
from attnlab.errors import check
from attnlab.io import write_json, write_text
from attnlab.train.text import TextRunConfig

METRICS = (
    ("valid", "valid", "{:.1%}"),
    ("agree", "agrees", "{:.1%}"),
    ("attribute_accuracy", "attr. acc.", "{:.1%}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("self_bleu_4", "self-BLEU-4", "{:.3f}"),
    ("gen_ppl", "gen. PPL", "{:.2f}"),
    ("train_cpu_s", "train CPU s", "{:.0f}"),
    ("ms_per_sample", "ms / sample", "{:.2f}"),
)


@dataclass
class TextVariant:
    """One design: `model` techniques (trained) or `sampling` techniques (on the reference's models)."""

    name: str = ""
    level: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    sample: dict[str, Any] = field(default_factory=dict)


@dataclass
class TextPocConfig:
    """A text PoC: `base` is a text run config (data, model, diffusion, train, sample), `variants`
    the designs (the first is the reference), `train_seeds` the training seeds, `num_samples` the
    samples per model (sample k conditioned on eval item k, seed k), `threads` torch threads per
    process, `workers` the training processes run side by side."""

    modality: str = "tokens"
    title: str = "text PoC"
    base: TextRunConfig = field(default_factory=TextRunConfig)
    variants: list[TextVariant] = field(default_factory=list)
    train_seeds: list[int] = field(default_factory=lambda: [0, 1])
    num_samples: int = 256
    threads: int = 1
    workers: int = 2

    def validate(self) -> None:
        self.base.validate()
        check(len(self.variants) >= 1, "variants", self.variants, "a reference and designs")
        names = [v.name for v in self.variants]
        check(all(names) and len(set(names)) == len(names), "variants", names, "distinct non-empty names")
        check(
            len(set(self.train_seeds)) == len(self.train_seeds) >= 1,
            "train_seeds",
            self.train_seeds,
            "distinct seeds",
        )
        check(
            not self.variants[0].sampling and not self.variants[0].model,
            "variants",
            names[0],
            "a reference without techniques",
        )
        for v in self.variants:
            check(
                not (v.model and v.sampling),
                f"variants.{v.name}",
                v.name,
                "model or sampling techniques, not both",
            )


def load_text_poc(path: str | Path, overrides: list[str] = ()) -> TextPocConfig:
    """The config of a YAML file with key=value overrides (ConfigError names the key)."""
    return build_structured(TextPocConfig, config_layers(path, overrides), str(path), fill_from_data=False)


# Running


def run_text_poc(path: str | Path, out: str | Path, overrides: list[str] = (), log=print) -> dict:
    """Run (or resume) the PoC of config `path` into `out`; returns the results."""
    from attnlab.evaluate.text_lm import lm_info

    cfg = load_text_poc(path, overrides)
    out = Path(out)
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    _train_all(cfg, out, log)
    scored = {v.name: [_score(cfg, v, seed, out, log) for seed in cfg.train_seeds] for v in cfg.variants}
    results = {
        "title": cfg.title,
        "train_seeds": cfg.train_seeds,
        "num_samples": cfg.num_samples,
        "variants": [dataclasses.asdict(v) for v in cfg.variants],
        "per_seed": scored,
        "floors": _floors(cfg, out),
        "reference_lm": lm_info(out / "reference_lm"),
        "wall_s": time.perf_counter() - t0,
    }
    results["heatmaps"] = _heatmaps(cfg, out)
    write_json(out / "results.json", results)
    write_text(out / "report.md", report(cfg, results, out))
    log(f"report: {out / 'report.md'}")
    return results


def _train_all(cfg: TextPocConfig, out: Path, log) -> None:
    """The reference LM once, then every (trained design, training seed) run not yet trained, in
    `workers` processes (spawned, one torch thread each)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from attnlab.train.text import build_token_data, reference_language_model, trained_to

    lm = out / "reference_lm"
    if not (lm / "reference_lm.json").is_file():
        data = build_token_data(cfg.base.data)
        source = reference_language_model(cfg.base.data, data, lm, steps=cfg.base.reference_lm_steps)
        log(f"reference LM: {source}")
    jobs = {}
    for v in cfg.variants:
        for seed in cfg.train_seeds:
            run_dir = _run_dir(cfg, v, seed, out)
            if trained_to(run_dir) < cfg.base.train.steps and run_dir not in jobs:
                jobs[run_dir] = _run_config(cfg, v if v.model else cfg.variants[0], seed)
    if not jobs:
        return
    log(f"training {len(jobs)} run(s) in {cfg.workers} process(es)")
    with ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn")) as pool:
        for done in pool.map(_train_job, jobs.values(), jobs, [lm] * len(jobs), [cfg.threads] * len(jobs)):
            log(f"trained {done}")


def _train_job(run_cfg: TextRunConfig, run_dir: Path, lm: Path, threads: int) -> Path:
    from attnlab.train.text import train_text

    torch.set_num_threads(threads)
    return train_text(run_cfg, run_dir, log=lambda *a: None, reference_lm=lm)


def _run_config(cfg: TextPocConfig, v: TextVariant, seed: int) -> TextRunConfig:
    base = cfg.base
    model = dataclasses.replace(base.model, techniques={**base.model.techniques, **v.model})
    return dataclasses.replace(base, model=model, train=dataclasses.replace(base.train, seed=seed))


def _run_dir(cfg: TextPocConfig, v: TextVariant, seed: int, out: Path) -> Path:
    trained = v if v.model else cfg.variants[0]  # training-free designs sample the reference's models
    return out / "runs" / f"{trained.name}-seed{seed}"


def _score(cfg: TextPocConfig, v: TextVariant, seed: int, out: Path, log) -> dict:
    from attnlab.train.text import draw_text, load_text_run, score_samples, write_jsonl

    done = out / "scores" / f"{v.name}-seed{seed}.json"
    if done.is_file():
        return json.loads(done.read_text())
    run = load_text_run(_run_dir(cfg, v, seed, out))
    s = {**dataclasses.asdict(cfg.base.sample), **v.sample}
    rows = draw_text(
        run,
        cfg.num_samples,
        seed=0,
        sampler=s["sampler"],
        steps=s["steps"],
        guidance=s["guidance"],
        techniques=v.sampling,
    )
    metrics = score_samples(run, rows)
    state = json.loads((run.path / "state.json").read_text())
    metrics["train_cpu_s"] = state["cpu_s"]
    metrics["ms_per_sample"] = 1000 * metrics["seconds_per_sample"]
    write_jsonl(out / "samples" / f"{v.name}-seed{seed}.jsonl", rows)
    write_json(done, metrics)
    log(f"{v.name} seed {seed}: valid {metrics.get('valid', 0):.3f} agree {metrics.get('agree', 0):.3f}")
    return metrics


def _floors(cfg: TextPocConfig, out: Path) -> dict:
    """The metrics of the real eval text against itself (the floors a model is read against): the
    same samples' worth of eval descriptions, parsed and checked against their own scenes."""
    from attnlab.evaluate.text import agreement, attribute_accuracy, diversity, validity
    from attnlab.evaluate.text_lm import load_lm, perplexity
    from attnlab.train.text import load_text_run

    run = load_text_run(_run_dir(cfg, cfg.variants[0], cfg.train_seeds[0], out))
    split, sc = run.data.splits["eval"], cfg.base.data.scenes()
    texts, scenes = split.texts[: cfg.num_samples], split.scenes[: cfg.num_samples]
    tok = run.data.tokenizer
    ids = tok.encode(texts)
    valid = validity(texts, [tok.decode(row)[1] for row in ids], sc)
    return {
        "valid": sum(valid) / len(texts),
        "agree": sum(agreement(texts, valid, scenes, sc)) / len(texts),
        "attribute_accuracy": attribute_accuracy(texts, valid, scenes, sc),
        **diversity(texts),
        "gen_ppl": perplexity(load_lm(run.path), ids, tok.bos_id, tok.pad_id),
    }


# Heat maps: generated tokens on condition tokens


def _heatmaps(cfg: TextPocConfig, out: Path) -> dict:
    """For the reference and each trained design that conditions in another way: one sample's
    attention of its generated tokens on its condition tokens (mean over heads, layers and steps)."""
    from attnlab.control.token_maps import TokenMaps
    from attnlab.diffusion.masked import sample_tokens
    from attnlab.train.text import load_text_run

    maps = {}
    for v in cfg.variants:
        if v.sampling:
            continue
        run = load_text_run(_run_dir(cfg, v, cfg.train_seeds[0], out))
        cond = run.data.condition("eval", torch.tensor([0]))
        if cond is None:
            continue
        rec = TokenMaps()
        from attnlab.attention import control

        with control(run.model, [rec]):
            ids = sample_tokens(
                run.model,
                (1, run.data.tokenizer.length),
                cond,
                mask_id=run.data.tokenizer.mask_id,
                steps=cfg.base.sample.steps,
                sampler=cfg.base.sample.sampler,
                seeds=[0],
            )
        m = rec.mean()
        if m is None:
            continue
        words = [run.data.tokenizer.tok.id_to_token(int(i)) for i in ids[0]]
        cond_words = run.data.splits["eval"].conditions[0]
        maps[v.name] = {
            "tokens": words,
            "condition": cond_words,
            "map": m[0, :, : len(cond_words)].tolist(),
            "source": rec.source,
        }
    return maps


# The report


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")


def _interval(a: list[float], b: list[float]) -> tuple[float, float, float] | None:
    """Mean of the paired differences a - b over training seeds and its 95% t interval (None with one seed)."""
    from attnlab.poc.metrics import t_quantile

    d = np.array(a) - np.array(b)
    if len(d) < 2:
        return None
    half = t_quantile(len(d)) * float(np.std(d, ddof=1)) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def report(cfg: TextPocConfig, results: dict, out: Path) -> str:
    per = results["per_seed"]
    ref = cfg.variants[0].name
    head = "| variant | level | " + " | ".join(label for _, label, _ in METRICS) + " |"
    lines = [
        f"# {cfg.title}",
        "",
        _setup(cfg, results),
        "",
        "## Results",
        "",
        head,
        "|" + "---|" * (len(METRICS) + 2),
    ]
    for v in cfg.variants:
        cells = []
        for key, _, fmt in METRICS:
            mean = _mean([s.get(key) for s in per[v.name]])
            cell = fmt.format(mean) if math.isfinite(mean) else "–"
            if v.name != ref and key not in ("train_cpu_s", "ms_per_sample"):
                iv = _interval([s[key] for s in per[v.name]], [s[key] for s in per[ref]])
                if iv is not None:
                    cell += f" ({_signed(fmt, iv[0])} [{_signed(fmt, iv[1])}, {_signed(fmt, iv[2])}])"
            cells.append(cell)
        lines.append(f"| {v.name} | {v.level} | " + " | ".join(cells) + " |")
    floors = results["floors"]
    cells = [fmt.format(floors[k]) if k in floors else "–" for k, _, fmt in METRICS]
    lines.append("| *eval text (floors)* | – | " + " | ".join(cells) + " |")
    lines += ["", _reading(cfg, per), "", "## Samples side by side", "", *_samples_table(cfg, out)]
    lines += ["", "## Heat maps: generated tokens on condition tokens", "", *_maps_text(results["heatmaps"])]
    return "\n".join(lines) + "\n"


def _signed(fmt: str, x: float) -> str:
    return ("+" if x >= 0 else "-") + fmt.format(abs(x))


def _setup(cfg: TextPocConfig, results: dict) -> str:
    b, lm = cfg.base, results.get("reference_lm", {})
    designs = "; ".join(
        f"{v.name} ({v.level}): {json.dumps(v.model or v.sampling)}" for v in cfg.variants[1:]
    )
    return (
        f"Data: {b.data.name} (train {b.data.num}, eval {b.data.num_eval}, ref {b.data.num_ref}); model: tokens "
        f"backbone width {b.model.width}, depth {b.model.depth}, heads {b.model.heads}; MDLM, {b.train.steps} steps of "
        f"{b.train.batch_size}; sampler {b.sample.sampler}, {b.sample.steps} steps, CFG {b.sample.guidance}. "
        f"Training seeds {cfg.train_seeds}; {cfg.num_samples} samples per model, sample k on eval condition k "
        f"with seed k. Each cell is the mean over training seeds; in brackets, a design's mean paired "
        f"difference from {cfg.variants[0].name} and its 95% t interval over the training seeds. Designs: {designs}. "
        f"Generative perplexity under the reference LM: {lm.get('source', 'trained on the ref split')}. "
        f"Wall time of this invocation (runs and scores a previous one finished are reused): "
        f"{results['wall_s'] / 60:.1f} min."
    )


def _reading(cfg: TextPocConfig, per: dict) -> str:
    ref = cfg.variants[0].name
    said = []
    for v in cfg.variants[1:]:
        for key in ("agree", "valid"):
            iv = _interval([s[key] for s in per[v.name]], [s[key] for s in per[ref]])
            if iv is not None and (iv[1] > 0 or iv[2] < 0):
                said.append(
                    f"{v.name} {'helps' if iv[0] > 0 else 'hurts'} {key} ({iv[0]:+.1%}, interval excludes 0)"
                )
    return "Where a design helps or hurts: " + (
        "; ".join(said) if said else "no interval excludes 0 at this budget."
    )


def _samples_table(cfg: TextPocConfig, out: Path, n: int = 8) -> list[str]:
    seed = cfg.train_seeds[0]
    rows = {v.name: _read_jsonl(out / "samples" / f"{v.name}-seed{seed}.jsonl")[:n] for v in cfg.variants}
    lines = ["| condition | " + " | ".join(rows) + " |", "|" + "---|" * (len(rows) + 1)]
    first = rows[cfg.variants[0].name]
    for k in range(len(first)):
        cond = " ".join(first[k]["condition"])
        cells = [_mark(rows[name][k]) for name in rows]
        lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    return lines + [
        "",
        "✓ agrees with its condition; ✗ valid but disagrees; ∅ not a sentence of the grammar.",
    ]


def _mark(r: dict) -> str:
    sign = "✓" if r.get("agrees") else ("✗" if r.get("valid") else "∅")
    return f"{sign} {r['text']}"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _maps_text(maps: dict) -> list[str]:
    lines = []
    for name, m in maps.items():
        cond = m["condition"]
        lines += [
            f"**{name}** (from {m['source']}): rows are generated tokens, columns condition tokens; each row sums to its share of attention on the condition.",
            "",
        ]
        lines += ["| token | " + " | ".join(cond) + " |", "|" + "---|" * (len(cond) + 1)]
        for tok, row in zip(m["tokens"], m["map"]):
            best = int(np.argmax(row)) if row else -1
            cells = [f"**{x:.2f}**" if j == best else f"{x:.2f}" for j, x in enumerate(row)]
            lines.append(f"| {tok} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines or ["(no conditioned model)"]
