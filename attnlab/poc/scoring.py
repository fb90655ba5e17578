"""The evaluation stages of a PoC: FID/KID and condition alignment per sampling seed, and the cost of
each variant (parameters, FLOPs, peak memory, training time), each kept in a stage marker."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from attnlab.evaluate import (
    Evaluator,
    count_flops,
    count_parameters,
    denoiser_flops,
    extract_features,
    peak_memory,
    score_samples,
    training_time,
)
from attnlab.generate import condition_for
from attnlab.io import atomic_path
from attnlab.poc.prompts import PromptSet
from attnlab.poc.sampling import VariantSampler, items_for
from attnlab.poc.stages import VariantDirs, fingerprint, run_stage

COST_SAMPLES = 4  # samples in the runs that count FLOPs and peak memory


def evaluator_fingerprint(ev: Evaluator) -> str:
    """Identifies an evaluator by the bytes of its weights, so changed weights redo every evaluation."""
    h = hashlib.sha256()
    for k, v in sorted(ev.net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return fingerprint("evaluator", ev.name, h.hexdigest())


def real_features(ev: Evaluator, eval_x: Tensor, out: Path, fp: str) -> Tensor:
    """Evaluator features of the eval split, computed once per (evaluator, eval split) `fp` and kept
    in `out/real/`."""
    path = out / "real" / f"features-{fp}.safetensors"
    if path.is_file():
        return load_file(str(path))["features"]
    feats = extract_features(eval_x, ev.feature_net())
    with atomic_path(path) as tmp:
        save_file({"features": feats.contiguous()}, str(tmp))
    return feats


def evaluate_stage(
    samples: Callable[[], Tensor],
    *,
    dataset: str,
    metrics: list[str],
    requests: Callable[[], list[dict] | None],
    ev: Evaluator,
    real: Callable[[], Tensor],
    marker: Path,
    fp: str,
) -> dict:
    """FID, KID and alignment of one seed's samples; skipped when done for these samples and evaluator.

    `samples` and `real` (eval-split features) are loaded only when the stage has work to do;
    `marker` is the stage record (e.g. variants/NAME/stages/evaluated-SEED.json)."""

    def score() -> dict:
        x = samples()
        real_f = real() if "fid" in metrics or "kid" in metrics else None
        asked = requests() if "alignment" in metrics else None
        found = score_samples(dataset, x, asked, real_features=real_f, evaluator=ev)
        return {"scores": _finite({k: v for k, v in found.items() if _reported(k, metrics)})}

    return run_stage(marker, fp, score)


def _reported(key: str, metrics: list[str]) -> bool:
    """Whether a `score_samples` key is kept: FID and the KID mean when asked for (not the KID spread
    over subsets), and every alignment key but the sample count."""
    if key in ("fid", "kid_mean", "kid_std"):
        return key != "kid_std" and key.split("_")[0] in metrics
    return key != "n"


def cost_stage(
    sampler: VariantSampler,
    prompts: PromptSet,
    run_dir: Path,
    dirs: VariantDirs,
    fp: str,
    memory: bool = True,
) -> dict:
    """Parameters, FLOPs per denoiser call and per sample, peak memory and training time of a variant."""
    return run_stage(dirs.marker("cost"), fp, lambda: _cost(sampler, prompts, run_dir, memory))


def _cost(sampler: VariantSampler, prompts: PromptSet, run_dir: Path, memory: bool) -> dict:
    model, items = sampler.model, items_for(prompts, 0)[:COST_SAMPLES]
    cond = condition_for(sampler.rc, items[:1], sampler.encoder)
    out = {
        "params": count_parameters(model),
        "flops_per_call": denoiser_flops(model, sampler.rc.model.sample_shape(), cond),
    }
    try:
        out["flops_per_sample"] = count_flops(lambda: sampler.draw(items[:1], 1))
    except RuntimeError as e:
        # The FLOP counter's backward hooks refuse torch.autograd.grad inside sampling (Attend-and-Excite).
        out["flops_per_sample_not_counted"] = str(e).splitlines()[0]
    if memory:
        out["peak_mem_bytes"] = peak_memory(lambda: sampler.draw(items, len(items)))
    out.update(training_time(run_dir))
    return out


def _finite(d: dict) -> dict:
    """nan (nothing to score) becomes None, so results are valid JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def localisation_stage(sampler: VariantSampler, eval_ds, num: int, seed: int, marker: Path, fp: str) -> dict:
    """Heat-map IoU of each eval image's shape words with their objects' masks (real images, so the
    masks are exact; see `attnlab.evaluate.word_localisation`), or of each eval cloud's shape words
    with their solids' points, with the variant's techniques installed; the noise seed is the
    sampling seed. Kept in `marker`."""
    return run_stage(marker, fp, lambda: _localisation(sampler, eval_ds, num, seed))


def _shape_words(eval_ds):
    """Per item, the shape word of each object with its ground truth: an image's object mask, or
    a cloud's points of the solid (the data allows only these two, `PocConfig`'s check)."""
    from attnlab.evaluate import points_word_targets, shapes_word_targets

    if getattr(eval_ds, "modality", None) == "points":
        return points_word_targets
    return lambda item: [t for t in shapes_word_targets(item) if t[0] == "shape"]


def _localisation(sampler: VariantSampler, eval_ds, num: int, seed: int) -> dict:
    import torch

    from attnlab.diffusion import scheduler_for
    from attnlab.evaluate import word_localisation

    items, targets = [eval_ds[i] for i in range(min(num, len(eval_ds)))], _shape_words(eval_ds)
    s = sampler.rc.sample
    with sampler.plan.installed(sampler.model):
        scores = word_localisation(
            sampler.model,
            sampler.encoder,
            torch.stack([it["x"] for it in items]),
            [it["text"] for it in items],
            [targets(it) for it in items],
            scheduler_for(sampler.rc, s.sampler),
            steps=s.steps,
            seed=seed,
        )["shape"]
    return {"scores": {"heatmap_iou": scores["iou"], "heatmap_area_iou": scores["area_iou"]}}
