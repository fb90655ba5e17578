"""Drawing samples from a trained model: requests -> conditions -> the sampling loop, batch by batch.

Each sample has its own seed, so any one of them can be drawn again alone from its provenance
(`regenerate`; the files that carry it are `attnlab.samples`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from attnlab.conditioning import Condition
from attnlab.config import RunConfig
from attnlab.diffusion import sample, scheduler_for
from attnlab.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class Item:
    """One sample to draw: its condition (a prompt, a label, or neither) and its seed."""

    prompt: str | None = None
    label: int | None = None
    seed: int = 0


def plan(prompts: Sequence[str], labels: Sequence[int], num: int, seed: int) -> list[Item]:
    """`num` items per prompt or label (or `num` unconditional ones), seeds seed, seed+1, ..."""
    conds: list[tuple[str | None, int | None]] = [(p, None) for p in prompts] + [
        (None, lab) for lab in labels
    ]
    conds = conds or [(None, None)]
    return [Item(p, lab, seed + i * num + k) for i, (p, lab) in enumerate(conds) for k in range(num)]


def check_items(cfg: RunConfig, items: Sequence[Item]) -> None:
    """Each item must carry the kind of condition the model was trained on."""
    kind = cfg.model.cond
    if kind == "text" and any(it.prompt is None for it in items):
        raise ConfigError("this model is text-conditioned: give --prompt TEXT (one or more)")
    if kind == "class":
        if any(it.label is None for it in items):
            raise ConfigError(
                f"this model is class-conditioned: give --label N with N in 0..{cfg.model.num_classes - 1}"
            )
        bad = [it.label for it in items if not 0 <= it.label < cfg.model.num_classes]
        if bad:
            raise ConfigError(
                f"--label {bad[0]} is out of range: the model has classes 0..{cfg.model.num_classes - 1}"
            )
    if kind == "none" and any(it.prompt is not None or it.label is not None for it in items):
        raise ConfigError("this model is unconditional: drop --prompt/--label")


def condition_for(cfg: RunConfig, items: Sequence[Item], encoder=None, device="cpu") -> Condition | None:
    if cfg.model.cond == "class":
        return Condition(labels=torch.tensor([it.label for it in items], device=device))
    if cfg.model.cond == "text":
        tokens, mask = encoder.encode([it.prompt for it in items])
        return Condition(tokens=tokens.float().to(device), mask=mask.bool().to(device))
    return None


def text_encoder_for(cfg: RunConfig):
    if cfg.model.cond != "text":
        return None
    from attnlab.conditioning.text import TextEncoder

    return TextEncoder()


def generate(
    model: nn.Module,
    cfg: RunConfig,
    items: Sequence[Item],
    *,
    sampler: str,
    steps: int,
    guidance: float,
    encoder=None,
    batch_size: int = 64,
    guidances: Sequence = (),
    progress: bool = False,
) -> Tensor:
    """Draw one sample per item.

    Args:
        model: a trained denoiser (see `attnlab.train.load_model`).
        cfg: its RunConfig (shape, conditioning and noise schedule come from it).
        items: what to draw (see `plan`).
        sampler, steps, guidance: the sampling loop's settings.
        encoder: the text encoder, for text-conditioned models.
        batch_size: samples per sampling-loop call (results do not depend on it).
        guidances: extra guidance terms for the sampling loop.
    Returns:
        (N, C, *spatial) samples in [-1, 1].
    """
    check_items(cfg, items)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        x = sample(
            model,
            cfg.model.sample_shape(len(chunk)),
            condition_for(cfg, chunk, encoder, device),
            scheduler=scheduler_for(cfg, sampler),
            steps=steps,
            guidance=guidance,
            seeds=[it.seed for it in chunk],
            guidances=guidances,
            progress=progress,
        )
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


def regenerate(file: str | Path, model: str | Path | None = None, batch_size: int = 1):
    """Draw the sample recorded in a sample file's provenance again; returns (x (C, ...), provenance).

    Args:
        file: a PNG or WAV written by `attnlab sample`.
        model: the model directory, if it moved since (its weights must hash the same).

    Raises:
        DataError: when the file carries no provenance of one sample, or a damaged one.
        CheckpointError: when the model directory is gone or its weights changed since.
    """
    from attnlab.control.plan import sampling_plan
    from attnlab.precision import set_precision
    from attnlab.samples import read_sample_provenance
    from attnlab.train.checkpoint import file_sha256, load_model, model_dir

    meta = read_sample_provenance(file)
    ckpt = Path(model) if model is not None else Path(meta["model_dir"])
    weights = model_dir(ckpt) / meta["weights"]
    if not weights.is_file() or file_sha256(weights) != meta["weights_sha256"]:
        raise CheckpointError(f"{weights}: missing or not the weights {file} was drawn with (sha256 differs)")
    net, cfg = load_model(ckpt, ema=meta["weights"].startswith("ema"))
    set_precision(net, meta.get("precision", "fp32"))  # files from before the key: fp32
    item = Item(meta["prompt"], meta["label"], meta["seed"])
    techniques = sampling_plan(meta.get("techniques", {}).get("sampling"))
    with techniques.installed(net):
        x = generate(
            net,
            cfg,
            [item],
            sampler=meta["sampler"],
            steps=meta["steps"],
            guidance=techniques.guidance(meta["guidance"]),
            encoder=text_encoder_for(cfg),
            batch_size=batch_size,
            guidances=techniques.guidances,
        )
    return x[0], meta
