"""The PoC report: results.json/csv, figures, and report.md (with report.html, the same Markdown as one
self-contained page) that open with a plain-words summary, then the tables grouped by level, the
plots, samples and heat maps."""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from pathlib import Path

import attnlab
from attnlab.io import write_text
from attnlab.poc import figures
from attnlab.poc.config import PocConfig
from attnlab.poc.document import (
    Audio,
    Bullets,
    Cell,
    Document,
    Figure,
    Gallery,
    Heading,
    Para,
    Table,
    markdown_to_html,
    to_markdown,
)
from attnlab.poc.metrics import ALIGNMENT, ALL, COST, QUALITY, Metric, Stat, difference, show
from attnlab.poc.prompts import PromptSet
from attnlab.poc.results import compare, stats_of, write_results
from attnlab.poc.sampling import SEED_STRIDE, load_samples
from attnlab.poc.stages import done, fingerprint, mark, seed_dirs
from attnlab.poc.summary import Summary
from attnlab.poc.variants import technique
from attnlab.techniques import LEVELS

REPORT_FILES = ("report.md", "report.html", "results.json", "results.csv")


def write_report(
    cfg: PocConfig,
    out: Path,
    entries: list[dict],
    prompts: PromptSet,
    heat: list[dict],
    floor: dict | None,
    wall: float,
) -> dict:
    """Write figures, results.json, results.csv, report.md and report.html; returns the results
    (with "skipped": True when the report of exactly these results is already there)."""
    from attnlab.rate.verdict import human_preference, votes_digest

    heat = [{k: h[k] for k in ("variant", "prompt", "words", "file", "path")} for h in heat]
    votes = votes_digest(out)  # a new vote makes the report stale; a PoC without votes keeps its fingerprint
    fp = fingerprint("report", attnlab.__version__, cfg.to_dict(), entries, prompts.shown, heat, floor)
    if votes:
        fp = fingerprint(fp, votes)
    marker = out / "stages" / "report.json"
    if done(marker, fp) is not None and all((out / f).is_file() for f in REPORT_FILES):
        return {**json.loads((out / "results.json").read_text()), "skipped": True}
    reference = cfg.reference_name
    summary = Summary(entries, reference, floor)
    results = {
        "title": title_of(cfg),
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "priority": cfg.priority,
        "reference": reference,
        "seeds": list(cfg.seeds),
        "train_seeds": cfg.training_seeds,
        "prompts": prompts.shown,
        "summary": summary.to_dict(cfg.priority),
        "variants": entries,
        "real_data": floor,
        "comparisons": compare(entries, reference),
        "heatmaps": [{k: h[k] for k in ("variant", "prompt", "words", "file")} for h in heat],
        "timing": {"wall_seconds_this_run": wall, **_compute(entries)},
        "config": cfg.to_dict(),
    }
    human = human_preference(out, entries, reference) if votes else None
    if human is not None:
        results["human_preference"] = human
        sentences = results["summary"]["sentences"]
        if human["sentence"]:  # only when the votes separate variants; the recommendation stays last
            sentences.insert(len(sentences) - 1, human["sentence"])
    write_results(out, results)
    figs = _figures(cfg, out, entries, prompts)
    doc = build_document(cfg, results, figs, heat)
    markdown = to_markdown(doc, out)
    write_text(out / "report.md", markdown)
    write_text(out / "report.html", markdown_to_html(markdown, out))
    mark(marker, fp, {"files": list(REPORT_FILES)})
    return {**results, "skipped": False}


def _on_pipeline(cfg) -> bool:
    return getattr(cfg, "kind", "") == "pipeline"


def title_of(cfg: PocConfig) -> str:
    if cfg.title:
        return cfg.title
    if _on_pipeline(cfg):
        return f"Training-free attention designs on the pipeline {Path(cfg.pipeline).name}"
    m = cfg.model
    unit = "px" if m.dims == 2 else "points" if m.backbone == "points" else "samples"
    return f"Attention designs on {cfg.data.name} ({m.size} {unit}, {m.backbone}, {m.cond}-conditioned)"


def _compute(entries: list[dict]) -> dict:
    trained = {
        (e["trained_by"], ts): r.get("train_seconds", 0.0) for e in entries for ts, r in e["train"].items()
    }
    side = max((r.get("side_by_side", 1) for e in entries for r in e["train"].values()), default=1)
    return {
        "train_seconds_total": sum(trained.values()),
        "train_side_by_side": side,
        # side by side, the models' training overlapped: the longest is about the wall time spent
        "train_seconds_wall": max(trained.values(), default=0.0) if side > 1 else sum(trained.values()),
        "sampling_seconds_total": sum(e["sampling_seconds"] for e in entries),
    }


# Figures


def _figures(cfg: PocConfig, out: Path, entries: list[dict], prompts: PromptSet) -> dict:
    fig_dir = out / "figures"
    made: dict = {}
    sr = cfg.data.sample_rate if cfg.model.dims == 1 else None
    cost = ALL["latency_s"]
    panels = [m for m in (_first(entries, QUALITY), _first(entries, ALIGNMENT)) if m is not None]
    if panels and any(cost.key in e["metrics"] for e in entries):
        keys = [cost.key] + [m.key for m in panels]
        made["tradeoff"] = figures.quality_vs_cost(
            fig_dir / "quality_vs_cost.png", figures.points_of(entries, keys), cost, panels
        )
    logs = _loss_logs(cfg, out, entries)
    if logs:
        made["loss"] = figures.loss_curves(fig_dir / "loss_curves.png", logs)
    seed, first = cfg.seeds[0], cfg.training_seeds[0]
    samples = {
        e["name"]: load_samples(seed_dirs(out, e["name"], cfg.training_seeds, first), seed) for e in entries
    }
    if getattr(cfg.model, "backbone", None) == "points":  # clouds are shown as their two-view previews
        samples = {n: _previews(x[:32]) for n, x in samples.items()}
    made["side_by_side"] = figures.side_by_side(
        fig_dir / "samples_side_by_side.png", samples, prompts.shown, sample_rate=sr
    )
    made["grids"] = {
        n: figures.sample_grid(fig_dir / f"grid-{n}.png", x[:32], sample_rate=sr) for n, x in samples.items()
    }
    if cfg.model.dims == 1 and getattr(cfg.model, "backbone", None) != "points":
        made["audio"] = {n: _wav(fig_dir / f"audio-{n}.wav", x[0], sr) for n, x in samples.items()}
    return made


def _previews(x):
    """(n, 3, N) clouds -> (n, 3, H, 2H) images in [-1, 1]: each cloud's two-view preview."""
    import torch

    from attnlab.data.pointfiles import preview

    imgs = [torch.from_numpy(preview(c, px=160)).permute(2, 0, 1) for c in x]
    return torch.stack(imgs).float() / 127.5 - 1


def _first(entries: list[dict], family: Sequence[Metric]) -> Metric | None:
    return next((m for m in family if any(m.key in e["metrics"] for e in entries)), None)


def _loss_logs(cfg: PocConfig, out: Path, entries: list[dict]) -> dict:
    """Loss records per trained model: 'reference', or 'reference (seed 1)' per training seed."""
    from attnlab.train.log import read_log

    logs = {}
    for owner in dict.fromkeys(e["trained_by"] for e in entries):
        for ts in cfg.training_seeds:
            path = seed_dirs(out, owner, cfg.training_seeds, ts).model / "log.jsonl"
            records = [r for r in read_log(path) if "loss" in r] if path.is_file() else []
            if records:
                logs[f"{owner} (seed {ts})" if cfg.replicated else owner] = records
    return logs


def _wav(path: Path, x, sample_rate: int) -> Path:
    import soundfile as sf

    from attnlab.io import atomic_path

    with atomic_path(path) as tmp:
        sf.write(
            str(tmp), x.reshape(-1).float().clamp(-1, 1).numpy(), sample_rate, format="WAV", subtype="PCM_16"
        )
    return path


# The document


def build_document(cfg: PocConfig, results: dict, figs: dict, heat: list[dict]) -> Document:
    entries, ref = results["variants"], results["reference"]
    doc = Document(results["title"])
    doc.add(Para(_meta(cfg, results)))
    doc.add(Heading("Summary"), Bullets(results["summary"]["sentences"]))
    doc.add(Heading("Variants"), _variants_table(cfg, entries, ref))
    comparisons = results["comparisons"]
    pipe = _on_pipeline(cfg)
    leads = {
        "Quality": "Sample quality against the reference images (lower is better)."
        if pipe
        else "Sample quality against the eval split (lower is better).",
        "Condition alignment": "How well a sample shows what its prompt asked for (higher is better)."
        if pipe
        else "How often a sample shows what its prompt asked for (higher is better, except errors).",
        "Cost": "What each design costs to sample (lower is better)."
        if pipe
        else "What each design costs to sample and to train (lower is better).",
    }
    for title, family in (("Quality", QUALITY), ("Condition alignment", ALIGNMENT), ("Cost", COST)):
        metrics = [m for m in family if any(m.key in e["metrics"] for e in entries)]
        if metrics:
            doc.add(
                Heading(title),
                Para(leads[title]),
                metric_table(entries, metrics, comparisons, ref, results["real_data"]),
            )
    if cfg.replicated:
        table = per_train_seed_table(entries, results["train_seeds"])
        if table is not None:
            doc.add(
                Heading("Per training seed"),
                Para(
                    "The headline metrics of each training seed's models (mean ± std over that seed's sampling "
                    "seeds): a difference that changes sign from one training seed to the next is not a finding."
                ),
                table,
            )
    if results.get("human_preference"):
        from attnlab.rate.verdict import section

        doc.add(*section(results["human_preference"], ref))
    _figure_sections(doc, cfg, figs, heat)
    doc.add(Heading("How this was measured"), Bullets(_method(cfg, results)))
    return doc


def _meta(cfg: PocConfig, results: dict) -> str:
    b = cfg.budget
    if _on_pipeline(cfg):
        t = results["timing"]
        return (
            f"{len(cfg.variants)} variants on the pretrained pipeline `{cfg.pipeline}` (nothing trained) · "
            f"{b.sample_steps} steps, guidance {b.guidance:g} · {b.num_samples} samples × {len(cfg.seeds)} sampling seeds · "
            f"priority: **{cfg.priority}** · compute: {t['sampling_seconds_total'] / 60:.1f} min sampling · {results['created']}"
        )
    train = f"{b.train_steps} training steps" if b.train_steps else f"{b.train_minutes:g} training minutes"
    t = results["timing"]
    return (
        f"{len(cfg.variants)} variants · {train} per trained model · {b.sample_steps} {cfg.sample.sampler} steps, "
        f"guidance {cfg.sample.guidance:g} · {b.num_samples} samples × {len(cfg.seeds)} sampling seeds × "
        f"{_count(len(cfg.training_seeds), 'training seed')} · priority: **{cfg.priority}** · "
        f"compute: {_training(t)}, {t['sampling_seconds_total'] / 60:.1f} min sampling · "
        f"{results['created']}"
    )


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _training(t: dict) -> str:
    if t.get("train_side_by_side", 1) > 1:
        return (
            f"{t['train_seconds_wall'] / 60:.1f} min training ({t['train_side_by_side']} models side by side, "
            f"{t['train_seconds_total'] / 60:.1f} process-minutes)"
        )
    return f"{t['train_seconds_total'] / 60:.1f} min training"


def group_title(group: int) -> str:
    return "reference and variants without a technique" if group == 0 else f"L{group} · {LEVELS[group]}"


def _grouped(entries: list[dict], row) -> list[tuple[str, list[list[Cell]]]]:
    groups: dict[int, list] = {}
    for e in entries:
        groups.setdefault(e["group"], []).append(row(e))
    return [(group_title(g), groups[g]) for g in sorted(groups)]


def _adds(e: dict) -> str:
    parts = [f"`{n}`" + (f" ({_opts(o)})" if o else "") for n, o in e["techniques"].items()]
    parts += [f"{k}={v}" for k, v in e["model"]["changes"].items()]
    text = ", ".join(parts) or "nothing (the base model)"
    return f"{text}: {e['note']}" if e["note"] else text


def _opts(opts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items())


def _variants_table(cfg: PocConfig, entries: list[dict], ref: str) -> Table:
    def row(e: dict) -> list[Cell]:
        papers = sorted({technique(n).paper for n in e["techniques"]})
        own = e["trained_by"] == e["name"]
        record = next(iter(e["train"].values()), {})
        seeds = f" × {len(e['train'])} seeds" if len(e["train"]) > 1 else ""
        model = (
            "the pretrained pipeline"
            if _on_pipeline(cfg)
            else f"trained ({record.get('train_steps', '?')} steps{seeds})"
            if own
            else f"reuses `{e['trained_by']}`"
        )
        levels = ", ".join(f"L{lv}" for lv in e["levels"]) or "–"
        name = f"`{e['name']}`" + (" (reference)" if e["name"] == ref and ref != "reference" else "")
        return [Cell(name), Cell(levels), Cell(_adds(e)), Cell(model), Cell("; ".join(papers) or "–")]

    return Table(["variant", "level", "adds", "model", "source"], _grouped(entries, row), left=5)


def metric_table(
    entries: list[dict], metrics: list[Metric], comparisons: dict, ref: str, floor: dict | None = None
) -> Table:
    """One column per metric (best bold, '≈ best' when within noise of it), plus the headline versus
    the reference; `floor` (real data scored the same way) comes first, for scale."""
    lead = metrics[0]
    differ = {
        m.key: len({e["metrics"][m.key]["mean"] for e in entries if m.key in e["metrics"]}) > 1
        for m in metrics
    }

    def row(e: dict) -> list[Cell]:
        stats = stats_of(e)
        cells = [Cell(f"`{e['name']}`")]
        for m in metrics:
            c = comparisons.get(m.key, {}).get(e["name"], {})
            note = "≈ best" if m.per_seed and c.get("within_noise_of_best") and not c.get("best") else ""
            if m.key == "train_seconds" and e["trained_by"] != e["name"]:
                note = f"of {e['trained_by']}"  # it samples that model: no training of its own
            cells.append(
                Cell(show(m, stats.get(m.key)), bold=bool(c.get("best")) and differ[m.key], note=note)
            )
        ref_stats = next((stats_of(x) for x in entries if x["name"] == ref), {})
        cells.append(versus(lead, stats.get(lead.key), ref_stats.get(lead.key), e["name"] == ref))
        return cells

    header = ["variant"] + [m.label for m in metrics] + [f"{lead.label} vs reference"]
    groups = _grouped(entries, row)
    if floor is not None and any(m.key in floor["metrics"] for m in metrics):
        real = stats_of(floor)
        cells = [Cell("real data")] + [Cell(show(m, real.get(m.key))) for m in metrics] + [Cell("–")]
        groups.insert(0, ("real training data: what a perfect model would score", [cells]))
    n = max((len(e.get("train", {})) for e in entries), default=1)
    return Table(header, groups, caption=_table_caption(metrics, n))


def per_train_seed_table(entries: list[dict], train_seeds: list[int]) -> Table | None:
    """Quality and alignment headlines per training seed, one column per (metric, training seed)."""
    metrics = [m for m in (_first(entries, QUALITY), _first(entries, ALIGNMENT)) if m is not None]
    if not metrics:
        return None

    def row(e: dict) -> list[Cell]:
        stats = stats_of(e)
        cells = [Cell(f"`{e['name']}`")]
        for m in metrics:
            grid = stats[m.key].by_train_seed if m.key in stats else ()
            for i in range(len(train_seeds)):
                cells.append(Cell(show(m, Stat.of(list(grid[i])) if i < len(grid) else None)))
        return cells

    header = ["variant"] + [f"{m.label}, seed {t}" for m in metrics for t in train_seeds]
    return Table(header, _grouped(entries, row), caption="Training seed t: the models trained from seed t.")


def versus(m: Metric, s: Stat | None, ref: Stat | None, is_ref: bool) -> Cell:
    """The difference from the reference with its verdict: better, worse, or within noise."""
    if is_ref:
        return Cell("reference")
    if s is None or ref is None:
        return Cell("–")
    d = difference(s, ref)
    if m.key == "latency_s" or not m.per_seed:
        text = f"{s.mean / ref.mean:.2f}×" if ref.mean else "–"
    else:
        diff = s.mean - ref.mean
        text = f"{'+' if diff >= 0 else '−'}{m.fmt(abs(diff))}"
        if d.interval is not None:
            text += f" [{_signed(m, d.interval[0])}, {_signed(m, d.interval[1])}]"
    if m.per_seed and not d.real:
        return Cell(text, note="within noise")
    if s.mean == ref.mean:
        return Cell(text, note="same")
    return Cell(text, note="better" if m.better(s.mean, ref.mean) else "worse")


def _signed(m: Metric, v: float) -> str:
    return f"{'+' if v >= 0 else '−'}{m.fmt(abs(v))}"


def _table_caption(metrics: list[Metric], train_seeds: int = 1) -> str:
    seeds = any(m.per_seed for m in metrics)
    parts = ["Bold: best"]
    if seeds and train_seeds > 1:
        parts.append(
            f"mean ± std over the {train_seeds} training seeds (each the mean over its sampling seeds); "
            "≈ best: within noise of the best"
        )
        if train_seeds > 2:
            parts.append("[a, b]: the 95% t interval of the difference from the reference")
    elif seeds:
        parts.append("mean ± std over the sampling seeds; ≈ best: within noise of the best")
    if any(not m.per_seed for m in metrics):
        parts.append("FLOPs, parameters, memory and training time are measured once")
    return "; ".join(parts) + "."


def _figure_sections(doc: Document, cfg: PocConfig, figs: dict, heat: list[dict]) -> None:
    if "tradeoff" in figs:
        doc.add(
            Heading("Quality versus cost"),
            Figure(
                figs["tradeoff"],
                "Each point is a variant (colour: level), with its spread over the seeds as error bars"
                + (", and a small dot per training seed" if cfg.replicated else "")
                + ". Better designs sit toward the low-cost side with better quality.",
            ),
        )
    if "loss" in figs:
        doc.add(
            Heading("Training loss"),
            Figure(
                figs["loss"],
                "Training loss per trained model and logging window (on long runs: thin, with a smoothed thick line). "
                "Every model sees the same batches, timesteps and noise at each step.",
                width=760,
            ),
        )
    doc.add(Heading("Samples"))
    what = (
        "two-view previews"
        if getattr(cfg.model, "backbone", None) == "points"
        else "spectrograms"
        if cfg.model.dims == 1
        else "samples"
    )
    doc.add(
        Figure(
            figs["side_by_side"],
            f"The first prompts, drawn by every variant with the same noise (seed {cfg.seeds[0]}): rows are variants, {what} in columns.",
        )
    )
    doc.add(Heading("Sample grid per variant", 3))
    width = 520 if cfg.model.dims == 2 else None
    grids = [
        Figure(p, f"`{n}`: its first samples of seed {cfg.seeds[0]}", width) for n, p in figs["grids"].items()
    ]
    doc.add(Gallery(grids))
    for name, path in figs.get("audio", {}).items():
        doc.add(Audio(path, f"`{name}`: first sample"))
    if heat:
        doc.add(
            Heading("Heat maps"),
            Para(
                "Per-word cross-attention maps (DAAM): where each word of the prompt acted on the sample, summed over steps and layers."
            ),
        )
        for h in heat:
            doc.add(
                Figure(
                    Path(h["path"]),
                    f"`{h['variant']}`: “{h['prompt']}”",
                    width=None if cfg.model.dims == 1 else 720,
                )
            )


def _method(cfg: PocConfig, results: dict) -> list[str]:
    if _on_pipeline(cfg):
        return _pipeline_method(cfg, results)
    b, n_seeds = cfg.budget, len(cfg.seeds)
    source = "given in the config" if cfg.prompts else "captions or labels drawn from the eval split"
    ev = f"the evaluator `{cfg.evaluator}`" if cfg.evaluator else f"the built-in `{cfg.data.name}` evaluator"
    return (
        [
            f"Every variant drew the same {b.num_samples} prompts ({source}) for each of the {n_seeds} sampling seeds "
            f"{', '.join(map(str, cfg.seeds))}; sample k of seed s starts from the noise of seed s·{SEED_STRIDE}+k, so variants differ only by design.",
            *_noise_model(cfg),
            f"FID and KID compare the features of {ev} for each seed's {b.num_samples} samples with the {cfg.data.num_eval} eval items. "
            "With few samples FID is biased upward: compare variants within this report, not with published numbers.",
            "Condition alignment: the evaluator reads each sample and checks what its prompt asked for "
            "(shape, colour, position, count for shapes; pitch by FFT and waveform for tones; the class otherwise); "
            "'all asked right' is the share of samples with everything right.",
            f"Real data: {b.num_samples} training items per seed, scored like a variant: the FID a perfect model would get "
            "with this many samples, and how often the evaluator reads the truth right.",
            f"Latency is wall time per sample in batches of {b.batch_size} on this machine; FLOPs per sample count one whole "
            "sampling run (classifier-free guidance, extra guidance calls and cached or gated attention included); "
            "peak memory is the most tensor bytes alive at once while sampling. Latency and training time are wall "
            "time: on a machine shared with other work they move with its load."
            + (
                f" The {results['timing']['train_side_by_side']} models were trained side by side, each in its own "
                "single-threaded process on the shared cores: their training times compare with each other, and each "
                "is longer than that model alone would take."
                if results["timing"].get("train_side_by_side", 1) > 1
                else ""
            ),
            f"Variants with the same architecture share one trained model per training seed ({', '.join(sorted({e['trained_by'] for e in results['variants']}))}); "
            "training-free variants add their techniques at sampling time only. Training time is the mean over the training seeds.",
            "Files: results.json (every number, per training seed and sampling seed), results.csv (one row per variant, "
            "training seed and sampling seed), variants/NAME/ (models, samples, stage records"
            + ("; one train-seed-T/ per training seed)." if cfg.replicated else ")."),
        ]
        + _localisation(cfg, results)
        + _not_counted(results["variants"])
    )


def _noise_model(cfg: PocConfig) -> list[str]:
    """How the numbers are aggregated and when a difference counts as real, for this PoC's seeds."""
    n, ts = len(cfg.training_seeds), ", ".join(map(str, cfg.training_seeds))
    if n == 1:
        return [
            f"Each number is the mean ± standard deviation (n − 1) over the {len(cfg.seeds)} sampling seeds of one "
            f"trained model per architecture (training seed {ts}). Two variants are **within noise** when their means "
            "differ by no more than √(std₁² + std₂²). That spread is the sampling seeds' only: a variant that changes "
            "the architecture is another trained model, and how much a new training seed moves it is not measured "
            "here, so such differences are reported as unreplicated and never recommended for adoption.",
        ]
    rule = (
        f"a difference is real when the 95% t interval (Student's t, {n - 1} degrees of freedom) of the {n} "
        "per-training-seed differences excludes 0"
        if n >= 3
        else "with 2 training seeds no interval is drawn: a difference is real only when both training seeds' "
        "differences have the same sign and each exceeds twice its standard error over the sampling seeds"
    )
    return [
        f"Every trained model was trained once per training seed ({ts}); training-free variants apply to each "
        "seed's model. Each number is the mean over the training seeds of each seed's mean over its sampling seeds, "
        "± the standard deviation (n − 1) of those per-training-seed means: the spread a new training run brings.",
        f"Differences are paired: for each training seed, a variant's difference from another is averaged over the "
        f"sampling seeds (same prompts, same noise, models from the same seed); {rule}. results.json holds every "
        "(training seed, sampling seed) value, and results.csv one row per value.",
    ]


def _localisation(cfg: PocConfig, results: dict) -> list[str]:
    if "localisation" not in cfg.metrics:
        return []
    areas = [
        s["heatmap_area_iou"]
        for e in results["variants"]
        for per_seed in e["per_train_seed"].values()
        for s in per_seed.values()
        if "heatmap_area_iou" in s
    ]
    points = cfg.data.name == "points"
    share = "the solids' share of the cloud's points" if points else "the objects' share of the image"
    chance = (
        f" A map that says nothing (all ones) scores {sum(areas) / len(areas):.3f}, {share}." if areas else ""
    )
    what, truth = ("clouds", "solid's points") if points else ("images", "mask")
    spread = (
        " (on points: each step's group-token maps spread onto the points with that step's grouping)"
        if points
        else ""
    )
    return [
        f"Heat-map IoU: the first {cfg.budget.num_samples} eval {what} are noised to the sampler's timesteps (noise of the "
        "sampling seed) and denoised once per timestep under their captions with the variant's techniques installed; each "
        "shape word's cross-attention map (DAAM: summed over steps, each layer and head upsampled and clamped, then averaged)"
        f"{spread}, min-max normalised and cut at 0.4, is compared with its object's {truth}. Techniques that act only in "
        "extra guidance passes or by sampling step (PAG, SAG, T-GATE, caching) leave these maps as their base model's."
        + chance
    ]


def _not_counted(entries: list[dict]) -> list[str]:
    names = [f"`{e['name']}`" for e in entries if "flops_per_sample_not_counted" in e["cost"]]
    if not names:
        return []
    return [
        f"FLOPs per sample are not counted for {', '.join(names)}: its sampling differentiates through the model, which the FLOP counter does not follow."
    ]


def _pipeline_method(cfg, results: dict) -> list[str]:
    b, n = cfg.budget, len(cfg.seeds)
    lines = [
        f"Every variant drew the same {b.num_samples} prompts for each of the {n} sampling seeds "
        f"{', '.join(map(str, cfg.seeds))} with the pipeline's own call; sample k of seed s starts from the noise of seed "
        f"s·{SEED_STRIDE}+k, so variants differ only by design.",
        f"Nothing was trained: every variant samples the one pretrained pipeline, so the verdicts rest on the {n} sampling "
        "seeds only. Each number is the mean ± standard deviation (n − 1) over them; two variants are **within noise** "
        "when their means differ by no more than √(std₁² + std₂²). A larger set of prompts or seeds narrows that.",
    ]
    if "clip_score" in cfg.metrics:
        lines.append(
            f"CLIP score: 100 × max(cos(image, prompt), 0) of the local CLIP model `{cfg.clip}`, averaged over each seed's samples (higher is better)."
        )
    if {"fid", "kid"} & set(cfg.metrics):
        lines.append(
            f"FID and KID compare the FID Inception's features (`{cfg.inception}`) of each seed's {b.num_samples} samples with "
            f"the images of `{cfg.reference_images}`. With few samples FID is biased upward: compare variants within this report."
        )
    lines.append(
        f"Latency is wall time per sample in batches of {b.batch_size} on {cfg.device}; FLOPs per sample count one whole "
        "pipeline call's denoiser work (classifier-free guidance and guidance passes included); peak memory is the most "
        "tensor bytes alive at once while sampling two prompts. Latency moves with the machine's load."
    )
    lines.append(
        "Files: results.json (every number per sampling seed), results.csv (one row per variant and sampling seed), "
        "variants/NAME/ (samples, stage records)."
    )
    return lines + _not_counted(results["variants"])
