"""The heat-map stage of a PoC: per-word cross-attention maps (DAAM, Tang et al. 2023) of one prompt,
drawn with a variant's techniques, as a figure for the report."""

from __future__ import annotations

from pathlib import Path

from attnlab.control import HeatMaps
from attnlab.control.explain import explain, prompt_words
from attnlab.control.figures import heat_curves, heat_overlays
from attnlab.diffusion import make_scheduler
from attnlab.poc.sampling import VariantSampler
from attnlab.poc.stages import VariantDirs, done, mark

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
    record = done(dirs.marker("heatmaps"), fp)
    if record is not None and path.is_file():
        return {**record, "skipped": True}
    rc, opts = sampler.rc, sampler.spec.get("heatmaps", {})
    m, d = rc.model, rc.diffusion
    shape = (m.in_channels, *([m.size] * m.dims))
    words = [w for w in prompt_words(prompt) if w not in STOPWORDS] or prompt_words(prompt)
    with sampler.plan.installed(sampler.model):
        x, maps = explain(
            sampler.model,
            sampler.encoder,
            prompt,
            words,
            shape=shape,
            scheduler=make_scheduler(rc.sample.sampler, d.num_train_timesteps, d.beta_schedule, d.prediction),
            steps=rc.sample.steps,
            guidance=rc.sample.guidance,
            seed=seed,
            heatmaps=HeatMaps(**opts),
            guidances=sampler.plan.guidances,
        )
    if m.dims == 1:
        heat_curves(path, x, maps, sample_rate or 8000, prompt)
    else:
        heat_overlays(path, x, maps, prompt)
    record = {"file": str(Path(path).relative_to(dirs.root)), "prompt": prompt, "words": words, "seed": seed}
    return {**mark(dirs.marker("heatmaps"), fp, record), "skipped": False}
