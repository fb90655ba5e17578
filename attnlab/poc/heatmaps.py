"""The heat-map stage of a PoC: per-word cross-attention maps (DAAM, Tang et al. 2023) of one prompt,
drawn with a variant's techniques, as a figure for the report."""

from __future__ import annotations

from attnlab.control import HeatMaps
from attnlab.control.explain import explain, prompt_words
from attnlab.control.figures import heat_clouds, heat_curves, heat_overlays
from attnlab.diffusion import scheduler_for
from attnlab.poc.sampling import VariantSampler
from attnlab.poc.stages import VariantDirs, run_stage

# Words that carry no object and would only add empty panels.
STOPWORDS = {"a", "an", "the", "at", "of", "and", "then", "to", "in", "on", "with", "tone"}


def heatmap_stage(
    sampler: VariantSampler,
    prompt: str,
    seed: int,
    dirs: VariantDirs,
    fp: str,
    sample_rate: int | None = None,
) -> dict:
    """Sample `prompt` once while recording cross-attention; write `heatmaps.png` beside the variant."""
    path = dirs.root / "heatmaps.png"

    def draw() -> dict:
        words = [w for w in prompt_words(prompt) if w not in STOPWORDS] or prompt_words(prompt)
        x, maps = _explain(sampler, prompt, words, seed)
        if sampler.rc.model.backbone == "points":  # a map per point, on the cloud's previews
            heat_clouds(path, x, maps, prompt)
        elif sampler.rc.model.dims == 1:
            heat_curves(path, x, maps, sample_rate or 8000, prompt)
        else:
            heat_overlays(path, x, maps, prompt)
        return {"file": str(path.relative_to(dirs.root)), "prompt": prompt, "words": words, "seed": seed}

    return run_stage(dirs.marker("heatmaps"), fp, draw, files=[path])


def _explain(sampler: VariantSampler, prompt: str, words: list[str], seed: int):
    """(sample, {word: map}) of `prompt` drawn with the variant's techniques installed."""
    rc, opts = sampler.rc, sampler.spec.get("heatmaps", {})
    with sampler.plan.installed(sampler.model):
        return explain(
            sampler.model,
            sampler.encoder,
            prompt,
            words,
            shape=rc.model.sample_shape(),
            scheduler=scheduler_for(rc, rc.sample.sampler),
            steps=rc.sample.steps,
            guidance=rc.sample.guidance,
            seed=seed,
            heatmaps=HeatMaps(**opts),
            guidances=sampler.plan.guidances,
        )
