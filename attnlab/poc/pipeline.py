"""The proof of concept on a pretrained diffusers pipeline: the same prompts and seeds through each
training-free design, scored for prompt alignment (CLIP score), quality (FID/KID against the user's
images) and cost, in the same report as the native PoC.

A pipeline PoC trains nothing: every variant samples the one pipeline, so its verdicts rest on the
sampling seeds alone (each metric is the mean and spread over them), and the report says so.

    title: "Training-free attention designs on our SD checkpoint"
    pipeline: /models/sd15             # a local diffusers pipeline folder (safetensors)
    prompts: prompts.txt               # one per line, a list, or a folder with metadata.jsonl (text)
    clip: /models/clip-vit-b32         # a local CLIP folder, for clip_score
    reference_images: /data/ours       # a folder of images, for fid / kid ...
    inception: /weights/pt_inception-2015-12-05-6726825d.pth   # ... with the FID Inception
    budget: {sample_steps: 25, num_samples: 64, batch_size: 8, guidance: 7.5, height: 512, width: 512}
    variants: [{name: reference}, {name: pag, techniques: {pag: {scale: 3.0}}}]
    metrics: [clip_score, fid, kid, cost]
    seeds: [0, 1, 2]
    priority: control

The layout under the PoC directory is the native PoC's (variants/NAME/samples, stages/), so a
rerun redoes only what changed and a killed run resumes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
from omegaconf import MISSING

from attnlab.errors import AttnlabError, ConfigError
from attnlab.errors import check as _check
from attnlab.poc.config import SEED_STRIDE, VariantConfig, check_variant_names
from attnlab.poc.prompts import PromptSet
from attnlab.poc.stages import done, fingerprint, run_stage, seed_dirs
from attnlab.precision import PRECISIONS

PIPELINE_METRICS = ("clip_score", "fid", "kid", "cost", "localisation")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class PipelineBudget:
    """Sampling work per variant and seed.

    Attributes:
        sample_steps: the pipeline's `num_inference_steps`.
        num_samples: samples per sampling seed (the prompts, cycled).
        batch_size: prompts per pipeline call (a sample does not depend on it).
        guidance: the pipeline's `guidance_scale`.
        height, width: the image size (None: the pipeline's default).
    """

    sample_steps: int = 25
    num_samples: int = 16
    batch_size: int = 4
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None


@dataclass
class PipelinePocConfig:
    """A proof of concept of training-free designs on a pretrained diffusers pipeline (see the
    module docstring). Variants name training-free techniques only (`techniques`; no `model`)."""

    title: str = ""
    pipeline: str = MISSING
    prompts: Any = MISSING
    clip: str | None = None
    reference_images: str | None = None
    inception: str | None = None
    budget: PipelineBudget = field(default_factory=PipelineBudget)
    variants: list[VariantConfig] = field(default_factory=list)
    metrics: list[str] = field(default_factory=lambda: ["clip_score", "cost"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    priority: Literal["quality", "control", "speed"] = "control"
    reference: str | None = None
    precision: str = "auto"
    device: str = "cpu"
    heatmaps: bool = True
    excite_words: list[str] | None = None
    threads: int = 0

    kind = "pipeline"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    # What the report reads of any PoC config

    @property
    def training_seeds(self) -> list[int]:
        return [0]  # nothing is trained: one "model", the pipeline

    @property
    def replicated(self) -> bool:
        return False

    @property
    def reference_name(self) -> str:
        return self.reference or self.variants[0].name

    def variant(self, name: str) -> VariantConfig:
        return next(v for v in self.variants if v.name == name)

    @property
    def sample(self):
        return SimpleNamespace(sampler="the pipeline's scheduler", guidance=self.budget.guidance)

    @property
    def data(self):
        return SimpleNamespace(name="pipeline", sample_rate=None)

    @property
    def model(self):
        return SimpleNamespace(dims=2, cond="text")

    def validate(self) -> None:
        validate(self)


def is_pipeline_config(path: str | Path) -> bool:
    """Whether a PoC YAML file is a pipeline PoC (it has a `pipeline` key)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False  # the native loader names the problem
    return isinstance(data, dict) and "pipeline" in data


def load_pipeline_poc_config(path: str | Path, overrides: list[str] = ()) -> PipelinePocConfig:
    """Load a pipeline PoC config from YAML with `key=value` overrides.

    Raises:
        ConfigError: naming the file or override, the key and what was expected.
    """
    from attnlab.configio import build_structured, config_layers

    layers = config_layers(path, overrides)
    cfg = build_structured(PipelinePocConfig, layers, str(path), fill_from_data=False)
    base = Path(path).resolve().parent
    for key in ("pipeline", "clip", "reference_images", "inception"):  # relative to the config file
        value = getattr(cfg, key)
        if value and not Path(value).is_absolute() and not Path(value).exists():
            setattr(cfg, key, str(base / value))
    if (
        isinstance(cfg.prompts, str)
        and not Path(cfg.prompts).is_absolute()
        and not Path(cfg.prompts).exists()
    ):
        cfg.prompts = str(base / cfg.prompts)
    return cfg


def validate(cfg: PipelinePocConfig) -> None:
    """Raise ConfigError naming the first key whose value is not allowed (the pipeline folder and
    the prompts are checked when the PoC runs, before anything is sampled)."""
    _check(bool(cfg.variants), "variants", cfg.variants, "at least one variant (each: name, techniques)")
    _check(len(set(cfg.seeds)) >= 3, "seeds", cfg.seeds, "at least 3 distinct sampling seeds")
    _check(len(set(cfg.seeds)) == len(cfg.seeds), "seeds", cfg.seeds, "sampling seeds without repeats")
    unknown = [m for m in cfg.metrics if m not in PIPELINE_METRICS]
    _check(
        bool(cfg.metrics) and not unknown,
        "metrics",
        cfg.metrics,
        f"a non-empty subset of {', '.join(PIPELINE_METRICS)}",
    )
    _check(cfg.precision in PRECISIONS, "precision", cfg.precision, " | ".join(PRECISIONS))
    b = cfg.budget
    _check(b.sample_steps >= 1, "budget.sample_steps", b.sample_steps, "a positive integer")
    _check(b.num_samples >= 2, "budget.num_samples", b.num_samples, "at least 2 (FID/KID compare sets)")
    _check(b.num_samples <= SEED_STRIDE, "budget.num_samples", b.num_samples, f"at most {SEED_STRIDE}")
    _check(b.batch_size >= 1, "budget.batch_size", b.batch_size, "a positive integer")
    for key in ("height", "width"):
        v = getattr(b, key)
        _check(
            v is None or (v >= 8 and v % 8 == 0),
            f"budget.{key}",
            v,
            "a multiple of 8, or null for the pipeline's",
        )
    if "clip_score" in cfg.metrics:
        _check(
            cfg.clip is not None,
            "clip",
            cfg.clip,
            "a local CLIP folder for clip_score (or drop clip_score from metrics)",
        )
    if {"fid", "kid"} & set(cfg.metrics):
        _check(
            cfg.reference_images is not None,
            "reference_images",
            cfg.reference_images,
            "a folder of images to compare with, for fid / kid (or drop them from metrics)",
        )
        _check(
            cfg.inception is not None,
            "inception",
            cfg.inception,
            "a local FID Inception weights file (pt_inception-2015-12-05-6726825d.pth), for fid / kid",
        )
    if "localisation" in cfg.metrics:
        _check(
            cfg.reference_images is not None,
            "reference_images",
            cfg.reference_images,
            "a folder whose metadata.jsonl rows carry masks {word: file}, for localisation",
        )
    names = check_variant_names(cfg.variants)
    for i, v in enumerate(cfg.variants):
        key = f"variants[{i}]"
        _check(
            not v.model and v.base is None, f"{key}.model", v.model, "nothing: a pipeline PoC trains no model"
        )
        for name, opts in v.techniques.items():
            _check_technique(name, opts, f"{key}.techniques.{name}")
    _check(
        cfg.reference is None or cfg.reference in names,
        "reference",
        cfg.reference,
        f"one of {', '.join(names)}",
    )


def _check_technique(name: str, opts, key: str) -> None:
    from attnlab.poc.variants import technique

    try:
        tech = technique(name)
    except KeyError as e:
        raise ConfigError(f"{key}: {e.args[0]}") from None
    _check(opts is None or isinstance(opts, dict), key, opts, "a mapping of options or null")
    _check(tech.training_free, key, opts, f"a training-free technique ({name} changes the architecture)")
    _check(tech.not_in_poc is None, key, opts, tech.not_in_poc or "")
    try:
        tech.build(**dict(opts or {}))
    except (TypeError, ValueError, AttnlabError) as e:
        raise ConfigError(f"{key}: {e}") from None


# Inputs


def read_prompts(cfg: PipelinePocConfig) -> list[str]:
    """The prompts: the config's list, a text file (one per line) or a folder's metadata.jsonl /
    metadata.csv `text` column.

    Raises:
        ConfigError: a missing file or folder, an empty list, or a metadata file without `text`.
    """
    p = cfg.prompts
    if isinstance(p, (list, tuple)) or (hasattr(p, "__iter__") and not isinstance(p, str)):
        texts = [str(t) for t in p]
    else:
        path = Path(str(p))
        if path.is_dir():
            texts = _metadata_texts(path)
        elif path.is_file():
            texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            raise ConfigError(f"prompts: {path} is neither a file of prompts (one per line) nor a folder")
    if not texts:
        raise ConfigError(f"prompts: {p!r} holds no prompt")
    return texts


def _metadata_texts(folder: Path) -> list[str]:
    import csv

    jsonl, table = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.is_file():
        rows = []
        for i, line in enumerate(jsonl.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ConfigError(f"prompts: {jsonl} line {i} is not JSON") from None
        where = jsonl
    elif table.is_file():
        with table.open(newline="") as f:
            rows, where = list(csv.DictReader(f)), table
    else:
        raise ConfigError(f"prompts: {folder} has no metadata.jsonl or metadata.csv (with a text column)")
    if not rows or any(not isinstance(r, dict) or "text" not in r for r in rows):
        raise ConfigError(f"prompts: {where} needs a `text` column in every row")
    return [str(r["text"]) for r in rows]


def prompt_set(cfg: PipelinePocConfig) -> PromptSet:
    texts = read_prompts(cfg)
    n = cfg.budget.num_samples
    given = [texts[i % len(texts)] for i in range(n)]
    return PromptSet(given, [None] * n, given, None)


def reference_images(folder: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1]: every image of a folder (recursively), RGB, resized to `size`.

    Raises:
        ConfigError: no such folder, no image in it, or an image Pillow cannot read (named).
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"reference_images: {folder} is not a folder")
    if (folder / "metadata.jsonl").is_file():  # its rows' images (not their masks)
        files = [
            folder / json.loads(line)["file_name"]
            for line in (folder / "metadata.jsonl").read_text().splitlines()
            if line.strip()
        ]
    else:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ConfigError(f"reference_images: {folder} holds {len(files)} image(s); FID/KID need at least 2")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                a = np.asarray(im.convert("RGB").resize((size[1], size[0]), Image.BICUBIC), dtype=np.float32)
        except (UnidentifiedImageError, OSError) as e:
            raise ConfigError(f"reference_images: {f} is not a readable image ({e})") from None
        out.append(torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)


# Running


class _Pipe:
    """The pipeline, loaded on first use (a rerun with every stage done loads nothing)."""

    def __init__(self, cfg: PipelinePocConfig):
        self.cfg, self._pipe = cfg, None

    def get(self):
        if self._pipe is None:
            from attnlab.integrations.diffusers.load import load_pipeline

            self._pipe = load_pipeline(self.cfg.pipeline, self.cfg.precision, self.cfg.device)
            self._pipe.set_progress_bar_config(disable=True)  # the PoC shows its own progress
        return self._pipe


def _size(cfg: PipelinePocConfig) -> dict:
    b = cfg.budget
    return {k: v for k, v in (("height", b.height), ("width", b.width)) if v is not None}


def _draw(cfg: PipelinePocConfig, pipe, spec: dict, texts: list[str], seeds: list[int], batch_size: int):
    """Images of `texts` from noise `seeds` with the variant's techniques (`spec`) installed."""
    from attnlab.control.plan import sampling_plan
    from attnlab.integrations.diffusers.load import generate
    from attnlab.integrations.diffusers.words import word_token_indices

    plan = sampling_plan(spec, bind_prompts=True)
    words = tuple(cfg.excite_words or ())

    def bind(rows: list[str]) -> list:
        out = []
        for tech in plan.per_batch:  # Attend-and-Excite: each row's chosen words' tokens
            idx = []
            for p in rows:
                found = []
                for w in words:
                    try:
                        found += word_token_indices(pipe, p, w)
                    except ConfigError:
                        pass
                idx.append(sorted(set(found)) or [1])
            out.append(dataclasses.replace(tech).bind(idx))
        return out

    b = cfg.budget
    return generate(
        pipe, texts, seeds, steps=b.sample_steps, guidance=b.guidance,
        controls=[*plan.controls, *plan.guidances], batch_size=batch_size, bind=bind, **_size(cfg),
    )  # fmt: skip


def run_pipeline_poc(cfg: PipelinePocConfig, out: str | Path, *, progress: bool = True, echo=None) -> dict:
    """Run (or resume) a pipeline proof of concept and write its report (see the module docstring).

    Returns:
        The results (what results.json holds).
    """
    from attnlab.integrations.diffusers.load import folder_family, read_index, weights_hashes
    from attnlab.io import remove_temporaries, write_text
    from attnlab.poc.progress import Progress
    from attnlab.poc.report import write_report
    from attnlab.poc.variants import technique

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    read_index(cfg.pipeline)  # a folder that is not a pipeline (or pickled weights) stops here
    fam = folder_family(cfg.pipeline)
    for i, v in enumerate(cfg.variants):
        for name in v.techniques:
            tech = technique(name)
            why = f" ({tech.pipelines_note})" if tech.pipelines_note else ""
            _check(fam in tech.pipelines, f"variants[{i}].techniques.{name}", fam,
                   f"a pipeline family {name} runs on{why}: {', '.join(tech.pipelines)}")  # fmt: skip
    prompts = prompt_set(cfg)
    if "clip_score" in cfg.metrics:
        from attnlab.evaluate.clip_score import load_clip

        scorer = load_clip(cfg.clip)  # a folder that is not CLIP stops before sampling
    text = json.dumps(cfg.to_dict(), indent=2) + "\n"
    if not (out / "poc.json").is_file() or (out / "poc.json").read_text() != text:
        write_text(out / "poc.json", text)
    pipe = _Pipe(cfg)
    weights = weights_hashes(cfg.pipeline)
    per_seed = 2 + ("localisation" in cfg.metrics)
    n_stages = len(cfg.variants) * (len(cfg.seeds) * per_seed + ("cost" in cfg.metrics)) + 2
    bar = Progress(n_stages, enabled=progress, echo=echo)
    start = time.perf_counter()
    try:
        real = _real_features(cfg, out, bar) if {"fid", "kid"} & set(cfg.metrics) else None
        refs = masked_images(cfg.reference_images) if "localisation" in cfg.metrics else None
        entries = [
            _variant(
                cfg,
                out,
                v,
                pipe,
                weights,
                prompts,
                scorer if "clip_score" in cfg.metrics else None,
                real,
                bar,
                refs,
            )
            for v in cfg.variants
        ]
        heat = _heatmaps(cfg, out, pipe, weights, prompts, bar)
        with bar.stage("report", "write report.md, report.html, results.json, results.csv") as st:
            results = write_report(cfg, out, entries, prompts, heat, None, time.perf_counter() - start)
            st.skipped = results.pop("skipped")
    finally:
        bar.close()
    return results


def _real_features(cfg: PipelinePocConfig, out: Path, bar):
    """The FID Inception features of `reference_images` (kept), read at the Inception's input size."""
    from safetensors.torch import load_file, save_file

    from attnlab.evaluate.inception import load_inception
    from attnlab.evaluate.quality import extract_features
    from attnlab.io import atomic_path

    path = out / "stages" / "real-features.safetensors"
    size = (299, 299)  # the FID Inception's input size (it resizes samples to it too)
    fp = fingerprint("pipeline-real", str(cfg.reference_images), size, str(cfg.inception),
                     sorted((p.name, p.stat().st_size) for p in Path(cfg.reference_images).rglob("*") if p.is_file()))  # fmt: skip

    def work() -> dict:
        x = reference_images(cfg.reference_images, size)
        feats = extract_features(x, load_inception(cfg.inception), batch_size=16)
        with atomic_path(path) as tmp:
            save_file({"features": feats.contiguous()}, str(tmp))
        return {"n": len(x), "size": list(size)}

    with bar.stage("reference images", "FID Inception features") as st:
        rec = run_stage(out / "stages" / "real-features.json", fp, work, files=[path])
        st.skipped = rec["skipped"]
    return load_file(str(path))["features"]


def _variant(
    cfg, out, v: VariantConfig, pipe, weights, prompts: PromptSet, scorer, real, bar, refs=None
) -> dict:
    from safetensors.torch import load_file

    from attnlab.poc.results import metric_stats
    from attnlab.poc.sampling import timed_samples_stage
    from attnlab.poc.variants import technique

    dirs = seed_dirs(out, v.name, [0], 0)
    spec = {n: dict(o or {}) for n, o in v.techniques.items()}
    b = cfg.budget
    per_seed, sampled = {}, {}
    for seed in cfg.seeds:
        fp = fingerprint("pipeline-sample", weights, cfg.precision, spec, b.sample_steps, b.guidance,
                         _size(cfg), prompts.texts, seed, cfg.excite_words)  # fmt: skip
        path = dirs.samples_file(seed)

        def draw(seed=seed) -> torch.Tensor:
            seeds = [seed * SEED_STRIDE + k for k in range(len(prompts.texts))]
            return _draw(cfg, pipe.get(), spec, prompts.texts, seeds, b.batch_size)

        with bar.stage(v.name, f"sample seed {seed}") as st:
            if done(dirs.marker(f"sampled-{seed}"), fp) is None or not path.is_file():
                pipe.get()  # loaded before the stage's clock starts
            rec = timed_samples_stage(dirs, seed, fp, draw)
            st.skipped, st.detail = rec["skipped"], f"{rec['latency_s'] * 1000:.0f} ms per sample"
        sampled[seed] = rec
        scores = {"latency_s": rec["latency_s"]}
        with bar.stage(v.name, f"evaluate seed {seed}") as st:
            efp = fingerprint("pipeline-evaluate", fp, sorted(set(cfg.metrics) - {"cost"}), str(cfg.clip),
                              None if real is None else float(real.double().sum()))  # fmt: skip

            def evaluate(path=path) -> dict:
                return {"scores": _scores(cfg, load_file(str(path))["x"], prompts.texts, scorer, real)}

            found = run_stage(dirs.marker(f"evaluated-{seed}"), efp, evaluate)
            st.skipped = found["skipped"]
        scores.update(found["scores"])
        if refs is not None:
            with bar.stage(v.name, f"heat-map IoU seed {seed}") as st:
                listing = [
                    (r.text, str(r.image), sorted((w, str(m)) for w, m in r.masks.items())) for r in refs
                ]
                lfp = fingerprint(
                    "pipeline-localisation",
                    weights,
                    cfg.precision,
                    spec,
                    b.sample_steps,
                    _size(cfg),
                    listing,
                    seed,
                )
                loc = run_stage(
                    dirs.marker(f"localised-{seed}"),
                    lfp,
                    lambda seed=seed: {"scores": localisation_scores(cfg, pipe.get(), spec, refs, seed)},
                )
                st.skipped = loc["skipped"]
            scores.update(loc["scores"])
        per_seed[seed] = scores
    cost = {}
    if "cost" in cfg.metrics:
        with bar.stage(v.name, "cost") as st:
            cfp = fingerprint(
                "pipeline-cost",
                weights,
                cfg.precision,
                spec,
                b.sample_steps,
                b.guidance,
                _size(cfg),
                prompts.texts[:2],
            )
            cost = run_stage(
                dirs.marker("cost"), cfp, lambda: _cost(cfg, pipe.get(), spec, prompts.texts[:2])
            )
            st.skipped = cost["skipped"]
        cost = {k: val for k, val in cost.items() if k not in ("fingerprint", "skipped")}
    levels = sorted({technique(n).level for n in spec})
    return {
        "name": v.name,
        "group": max(levels) if levels else 0,
        "levels": levels,
        "techniques": spec,
        "sampling": spec,
        "model": {"techniques": {}, "changes": {}},
        "base": None,
        "trained_by": "pipeline",
        "note": v.note,
        "train_seeds": [0],
        "metrics": {k: s.to_dict() for k, s in metric_stats({0: per_seed}, cost).items()},
        "per_train_seed": {"0": {str(s): sc for s, sc in per_seed.items()}},
        "cost": cost,
        "train": {},
        "samples": {"0": {str(s): r["file"] for s, r in sampled.items()}},
        "sampling_seconds": sum(r["seconds"] for r in sampled.values()),
    }


def _scores(cfg: PipelinePocConfig, x: torch.Tensor, texts: list[str], scorer, real) -> dict:
    out = {}
    if scorer is not None:
        out["clip_score"] = float(scorer.mean_score(x, texts))
    if real is not None:
        from attnlab.evaluate.inception import load_inception
        from attnlab.evaluate.quality import extract_features, fid_kid_from_features

        fake = extract_features(x, load_inception(cfg.inception), batch_size=16)
        q = fid_kid_from_features(real, fake)
        out.update({k: q[k] for k in ("fid", "kid_mean", "kid_std") if k.split("_")[0] in cfg.metrics})
    return out


def _cost(cfg: PipelinePocConfig, pipe, spec: dict, texts: list[str]) -> dict:
    """Parameters of the denoiser, FLOPs of drawing one sample, peak memory of drawing two."""
    from attnlab.evaluate.cost import count_flops, count_parameters, peak_memory
    from attnlab.integrations.diffusers.load import denoiser

    out = {"params": count_parameters(denoiser(pipe))}
    try:
        out["flops_per_sample"] = count_flops(lambda: _draw(cfg, pipe, spec, texts[:1], [0], 1))
    except RuntimeError as e:  # the FLOP counter refuses autograd inside sampling (Attend-and-Excite)
        out["flops_per_sample_not_counted"] = str(e).splitlines()[0]
    out["peak_mem_bytes"] = peak_memory(
        lambda: _draw(cfg, pipe, spec, texts, [0] * len(texts), len(texts)), cfg.device
    )
    return out


def _heatmaps(cfg: PipelinePocConfig, out: Path, pipe, weights, prompts: PromptSet, bar) -> list[dict]:
    """Per-word heat maps of the reference variant for the first prompt (DAAM through the host)."""
    if not cfg.heatmaps:
        bar.skip("heat maps (none asked for)")
        return []
    from attnlab.control.explain import prompt_words
    from attnlab.control.figures import heat_overlays
    from attnlab.integrations.diffusers.words import explain

    v = cfg.variant(cfg.reference_name)
    dirs = seed_dirs(out, v.name, [0], 0)
    prompt, seed = prompts.texts[0], cfg.seeds[0] * SEED_STRIDE
    words = prompt_words(prompt)
    b = cfg.budget
    fp = fingerprint(
        "pipeline-heatmaps",
        weights,
        cfg.precision,
        v.techniques,
        b.sample_steps,
        b.guidance,
        _size(cfg),
        prompt,
        seed,
    )
    path = dirs.root / "heatmaps.png"

    def work() -> dict:
        from attnlab.control.plan import sampling_plan

        plan = sampling_plan({n: dict(o or {}) for n, o in v.techniques.items()}, bind_prompts=True)
        x, maps = explain(pipe.get(), prompt, words, seed=seed, steps=b.sample_steps, guidance=b.guidance,
                          controls=[*plan.controls, *plan.guidances])  # fmt: skip
        heat_overlays(path, x, maps, prompt)
        return {"file": path.name, "words": list(maps), "prompt": prompt}

    with bar.stage(v.name, "heat maps") as st:
        rec = run_stage(dirs.marker("heatmaps"), fp, work, files=[path])
        st.skipped = rec["skipped"]
    return [
        {
            "variant": v.name,
            "prompt": rec["prompt"],
            "words": rec["words"],
            "file": rec["file"],
            "path": str(path),
        }
    ]


# Heat-map localisation on the user's own masked images


@dataclass
class MaskedImage:
    """One reference image with its caption and, per word, the mask of the object it names."""

    image: Path
    text: str
    masks: dict[str, Path]


def masked_images(folder: str | Path) -> list[MaskedImage]:
    """The rows of `reference_images/metadata.jsonl` that carry masks:
    {"file_name": "img/0001.png", "text": "a red car on a street", "masks": {"car": "masks/0001-car.png"}}
    (paths relative to the folder; a mask is white where the object is).

    Raises:
        ConfigError: no metadata.jsonl, a bad row, a missing file, or no row with masks (named).
    """
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise ConfigError(
            f"reference_images: {meta} not found; localisation reads rows with file_name, text and masks"
        )
    out = []
    for i, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"reference_images: {meta} line {i} is not JSON") from None
        masks = row.get("masks") if isinstance(row, dict) else None
        if not masks:
            continue
        if not isinstance(masks, dict) or "file_name" not in row or "text" not in row:
            raise ConfigError(
                f"reference_images: {meta} line {i}: expected file_name, text and masks {{word: file}}"
            )
        files = {w: folder / m for w, m in masks.items()}
        for f in [folder / row["file_name"], *files.values()]:
            if not f.is_file():
                raise ConfigError(f"reference_images: {meta} line {i}: {f} not found")
        for w in files:
            if not re_word(w, row["text"]):
                raise ConfigError(
                    f"reference_images: {meta} line {i}: the mask's word {w!r} is not in {row['text']!r}"
                )
        out.append(MaskedImage(folder / row["file_name"], str(row["text"]), files))
    if not out:
        raise ConfigError(f"reference_images: no row of {meta} has masks, which localisation needs")
    return out


def re_word(word: str, text: str) -> bool:
    import re

    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def _read_rgb(path: Path, size: tuple[int, int], mask: bool = False) -> torch.Tensor:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if mask else "RGB").resize(
                (size[1], size[0]), Image.NEAREST if mask else Image.BICUBIC
            )
            a = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"reference_images: {path} is not a readable image ({e})") from None
    t = torch.from_numpy(a)
    return t > 127 if mask else t.permute(2, 0, 1) / 127.5 - 1


def _noised(sched, z0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """z0 noised to timestep t in the sample space of the scheduler's loop."""
    t = torch.as_tensor(t).reshape(1)
    if hasattr(sched, "scale_noise"):  # flow matching: (1 - sigma) z0 + sigma eps
        return sched.scale_noise(z0, t, eps)
    return sched.add_noise(z0, eps, t.long() if not t.is_floating_point() else t)


def localisation_scores(cfg: PipelinePocConfig, pipe, spec: dict, refs: list[MaskedImage], seed: int) -> dict:
    """Heat-map IoU of the masked words on the user's real images, with the variant's techniques
    installed, as the native PoC scores shapes: each image, encoded by the pipeline's VAE, is noised
    to the sampler's timesteps (one noise per image, from `seed`) and the pipeline's own call
    denoises it once per timestep under its caption (its scheduler's step is replaced by the next
    noising of the real image) while DAAM's maps are recorded; each word's map, min-max normalised
    and cut at 0.4, is compared with its mask. Returns heatmap_iou (mean over words), the pointing
    game and the IoU of an all-ones map (what a map that says nothing scores)."""
    from attnlab.control import HeatMaps, normalise
    from attnlab.control.plan import sampling_plan
    from attnlab.evaluate.localisation import heatmap_localisation
    from attnlab.integrations.diffusers.load import call_arguments, denoiser, family
    from attnlab.integrations.diffusers.words import word_token_indices

    if family(pipe) == "flux":
        raise ConfigError("metrics: localisation reads latent images; Flux packs its latents as tokens")
    den, vae, sched = denoiser(pipe), pipe.vae, pipe.scheduler
    side = den.config.sample_size * pipe.vae_scale_factor
    size = (cfg.budget.height or side, cfg.budget.width or side)
    plan = sampling_plan(spec, bind_prompts=True)
    maps, masks = [], []
    g = torch.Generator().manual_seed(seed)
    for ref in refs:
        x = _read_rgb(ref.image, size)[None].to(vae.device, vae.dtype)
        with torch.no_grad():
            z0 = vae.encode(x).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z0 = ((z0 - shift) * vae.config.scaling_factor).float().cpu()
        eps = torch.randn(z0.shape, generator=g)
        sched.set_timesteps(cfg.budget.sample_steps)
        steps = sched.timesteps.clone()
        start = _noised(sched, z0, eps, steps[0]) / sched.init_noise_sigma
        step, seen = sched.step, {"i": 0}

        def renoise(
            model_output, timestep, sample, *args, step=step, z0=z0, eps=eps, steps=steps, seen=seen, **kw
        ):
            out = step(model_output, timestep, sample, *args, **kw)
            seen["i"] += 1
            if seen["i"] < len(steps):
                nxt = _noised(sched, z0, eps, steps[seen["i"]]).to(sample)
                if isinstance(out, tuple):
                    out = (nxt, *out[1:])
                else:
                    out.prev_sample = nxt
            return out

        hm = HeatMaps()
        sched.__dict__["step"] = renoise
        try:
            from attnlab.attention import control

            # guidance 1: the cond rows' maps are the same without the uncond pass, which costs a pass
            kw = call_arguments(pipe, [ref.text], [seed], cfg.budget.sample_steps, 1.0)
            with control(pipe, [hm, *plan.controls, *plan.guidances], seeds=[seed]):
                pipe(
                    **{**kw, "output_type": "latent"},
                    latents=start.to(den.device, den.dtype),
                    height=size[0],
                    width=size[1],
                )
        finally:
            sched.__dict__.pop("step", None)
        heat = hm.maps(tuple(z0.shape[2:])).cpu()  # (1, L, h, w)
        for word, mask in ref.masks.items():
            idx = word_token_indices(pipe, ref.text, word)
            maps.append(normalise(heat[:1, idx].mean(1))[0])
            masks.append(_read_rgb(mask, size, mask=True))
    mk = torch.stack(masks)
    scores = heatmap_localisation(torch.stack(maps), mk)
    return {
        "mask_iou": scores["iou"],
        "mask_pointing": scores["pointing"],
        "mask_area_iou": float(mk.flatten(1).float().mean(1).mean()),
    }
