"""The sampling stage of a PoC: each variant draws the same prompts with the same noise seeds, with its
training-free techniques installed, and the wall time per sample is kept as its latency."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from attnlab.config import RunConfig
from attnlab.control.plan import SamplingPlan, sampling_plan
from attnlab.generate import Item, generate
from attnlab.io import atomic_path
from attnlab.poc.config import SEED_STRIDE
from attnlab.poc.prompts import PromptSet
from attnlab.poc.stages import VariantDirs, fingerprint, run_stage
from attnlab.precision import set_precision

# Default words Attend-and-Excite strengthens, per dataset: the words that name objects.
OBJECT_WORDS = {
    "shapes": ("circle", "square", "triangle", "diamond", "cross"),
    "tones": ("sine", "square", "saw", "triangle"),
}


@dataclass
class VariantSampler:
    """Draws samples the way a variant does: its plan of controls and guidance terms, with the
    prompt-bound ones (Attend-and-Excite) bound to each batch's prompts."""

    model: nn.Module
    rc: RunConfig
    spec: dict[str, dict]
    encoder: object = None
    excite_words: Sequence[str] = ()
    plan: SamplingPlan = field(init=False)

    def __post_init__(self):
        self.plan = sampling_plan(self.spec, bind_prompts=True)
        set_precision(self.model, self.rc.sample.precision)  # resolved by the PoC's run config

    def draw(self, items: Sequence[Item], batch_size: int, progress: bool = False) -> Tensor:
        """(N, C, *spatial) samples of `items`, in batches of `batch_size`."""
        with self.plan.installed(self.model):
            out = [self._batch(items[i : i + batch_size], progress) for i in range(0, len(items), batch_size)]
        return torch.cat(out)

    def _batch(self, chunk: Sequence[Item], progress: bool) -> Tensor:
        s = self.rc.sample
        return generate(
            self.model,
            self.rc,
            chunk,
            sampler=s.sampler,
            steps=s.steps,
            guidance=self.plan.guidance(s.guidance),
            encoder=self.encoder,
            batch_size=len(chunk),
            guidances=self.plan.for_prompts([it.prompt for it in chunk], self.encoder, self.excite_words),
            progress=progress,
        )


def items_for(prompts: PromptSet, seed: int) -> list[Item]:
    """The items of sampling seed `seed`: one per prompt, each with its own noise seed."""
    return [
        Item(t, lab, seed * SEED_STRIDE + k) for k, (t, lab) in enumerate(zip(prompts.texts, prompts.labels))
    ]


def sample_fingerprint(
    model_fp: str, spec: dict, rc: RunConfig, prompts: PromptSet, seed: int, ema: bool
) -> str:
    s = rc.sample
    low = () if s.precision == "fp32" else (s.precision,)  # fp32 runs keep their fingerprints
    return fingerprint(
        "sample",
        model_fp,
        spec,
        s.sampler,
        s.steps,
        s.guidance,
        prompts.texts,
        prompts.labels,
        seed,
        ema,
        *low,
    )


def sampling_settings(rc: RunConfig) -> dict:
    """The run's sampling settings as a stage fingerprint reads them (precision only when not fp32,
    so that runs from before the key existed keep their fingerprints)."""
    d = dataclasses.asdict(rc.sample)
    return {k: v for k, v in d.items() if k != "precision" or v != "fp32"}


def sample_stage(
    sampler: VariantSampler, dirs: VariantDirs, prompts: PromptSet, seed: int, fp: str, batch_size: int
) -> dict:
    """Draw (or find) the samples of one seed; records latency_s (wall seconds per sample)."""
    return timed_samples_stage(dirs, seed, fp, lambda: sampler.draw(items_for(prompts, seed), batch_size))


def timed_samples_stage(dirs: VariantDirs, seed: int, fp: str, draw) -> dict:
    """The sampling stage of one seed: `draw()` timed, its (N, C, ...) samples written whole to
    the seed's file, and the record (file, seconds, latency_s per sample, n) kept in its marker."""
    path = dirs.samples_file(seed)

    def work() -> dict:
        start = time.perf_counter()
        x = draw()
        seconds = time.perf_counter() - start
        with atomic_path(path) as tmp:
            save_file({"x": x.contiguous()}, str(tmp), metadata={"fingerprint": fp})
        return {
            "file": str(path.relative_to(dirs.root)),
            "seconds": seconds,
            "latency_s": seconds / len(x),
            "n": len(x),
        }

    return run_stage(dirs.marker(f"sampled-{seed}"), fp, work, files=[path])


def load_samples(dirs: VariantDirs, seed: int) -> Tensor:
    return load_file(str(dirs.samples_file(seed)))["x"]
