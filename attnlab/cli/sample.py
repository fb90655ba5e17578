"""`attnlab sample` and `attnlab regenerate`: samples from a model directory, each file carrying the
provenance needed to draw it again."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

import attnlab
from attnlab.errors import CheckpointError, ConfigError
from attnlab.io import write_json

SAMPLER_NAMES = ("ddpm", "ddim", "dpm++")  # attnlab.diffusion.SAMPLERS, without importing diffusers here


def provenance_base(
    ckpt: Path, weights: Path, cfg, sampler: str, steps: int, guidance: float, techniques: dict
) -> dict:
    """What every sample of one run of `sample` shares."""
    from attnlab.train.checkpoint import file_sha256

    return {
        "attnlab": attnlab.__version__,
        "model_dir": str(ckpt.resolve()),
        "weights": weights.name,
        "weights_sha256": file_sha256(weights),
        "sampler": sampler,
        "steps": steps,
        "guidance": guidance,
        "prediction": cfg.diffusion.prediction,
        "techniques": techniques,
    }


def model_techniques(cfg) -> dict:
    """The architectural techniques (L1-L4) the model was trained with."""
    return {"model": dict(cfg.model.techniques)}


def write_samples(out: Path, x, items: list, base: dict, cfg, grid_rows: int) -> list[str]:
    """One file per sample with its provenance, plus a grid for images; returns the file names."""
    from attnlab.cli.outputs import grid, save_array_png, save_png, save_wav, slug

    names = []
    for i, (xi, it) in enumerate(zip(x, items)):
        meta = {**base, "prompt": it.prompt, "label": it.label, "seed": it.seed}
        stem = f"{i:03d}-{slug(_describe(it))}-seed{it.seed}"
        if cfg.model.dims == 1:
            save_wav(out / f"{stem}.wav", xi, cfg.data.sample_rate, meta)
            names.append(f"{stem}.wav")
        else:
            save_png(out / f"{stem}.png", xi, meta)
            names.append(f"{stem}.png")
    if cfg.model.dims == 2:
        scale = max(1, 64 // cfg.model.size)  # small images are shown at least 64 px wide
        save_array_png(
            out / "grid.png", grid(x, grid_rows), {**base, "items": [vars(it) for it in items]}, scale
        )
    return names


def _describe(item) -> str:
    if item.prompt is not None:
        return item.prompt
    return f"label-{item.label}" if item.label is not None else "uncond"


def sample_command(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory (its latest checkpoint) or a checkpoint directory.")
    ],
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", "-p", help="Text prompt; repeat for several (text models)."),
    ] = None,
    label: Annotated[
        list[int] | None, typer.Option("--label", "-l", help="Class id; repeat for several (class models).")
    ] = None,
    num: Annotated[int, typer.Option("--num", "-n", min=1, help="Samples per prompt or label.")] = 4,
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, help="Sampling steps (default: the run's sample.steps).")
    ] = None,
    sampler: Annotated[
        str | None, typer.Option("--sampler", help="ddpm, ddim or dpm++ (default: the run's sample.sampler).")
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(
            "--guidance", "-g", help="Classifier-free guidance scale (default: the run's sample.guidance)."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the first sample; the k-th sample uses seed + k.")
    ] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = ...,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Sample with the EMA weights.")] = True,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Samples per batch (results do not depend on it).")
    ] = 64,
    threads: Annotated[int, typer.Option("--threads", help="torch CPU threads (0 = all cores).")] = 0,
    pag: Annotated[float, typer.Option("--pag", help="Perturbed-attention guidance scale (0 = off).")] = 0.0,
    pag_layers: Annotated[
        str, typer.Option("--pag-layers", help="Self-attention layers PAG perturbs.")
    ] = "**",
    sag: Annotated[float, typer.Option("--sag", help="Self-attention guidance scale (0 = off).")] = 0.0,
    sag_layers: Annotated[
        str, typer.Option("--sag-layers", help="Self-attention layers SAG's mask uses.")
    ] = "**",
    tgate: Annotated[
        float | None,
        typer.Option("--tgate", help="T-GATE: freeze cross-attention from this fraction of the steps."),
    ] = None,
    tgate_drop_cfg: Annotated[
        bool,
        typer.Option("--tgate-drop-cfg", help="T-GATE: also drop classifier-free guidance after the gate."),
    ] = False,
    cache_every: Annotated[
        int, typer.Option("--cache-every", min=1, help="Recompute attention every k steps, reuse in between.")
    ] = 1,
):
    """Draw samples: PNG files and a grid (images) or WAV files (audio), and request.json."""
    from attnlab.cli.generate import generate, plan, text_encoder_for
    from attnlab.control.plan import cli_spec, sampling_plan
    from attnlab.train.checkpoint import load_model, model_dir, weights_file

    techniques = sampling_plan(cli_spec(pag, pag_layers, sag, sag_layers, tgate, tgate_drop_cfg, cache_every))

    torch_threads(threads)
    model, cfg = load_model(run_dir, ema=ema)
    s = cfg.sample
    sampler, steps, guidance = (
        sampler or s.sampler,
        steps or s.steps,
        s.guidance if guidance is None else guidance,
    )
    if sampler not in SAMPLER_NAMES:
        raise ConfigError(f"--sampler {sampler!r} is not supported; choose one of {', '.join(SAMPLER_NAMES)}")
    items = plan(prompt or [], label or [], num, seed)
    ckpt = model_dir(run_dir)
    base = provenance_base(
        ckpt,
        weights_file(ckpt, ema),
        cfg,
        sampler,
        steps,
        guidance,
        {**model_techniques(cfg), "sampling": techniques.spec},
    )
    with techniques.installed(model):
        x = generate(
            model,
            cfg,
            items,
            sampler=sampler,
            steps=steps,
            guidance=techniques.guidance(guidance),
            encoder=text_encoder_for(cfg),
            batch_size=batch_size,
            guidances=techniques.guidances,
            progress=True,
        )
    out.mkdir(parents=True, exist_ok=True)
    rows = max(1, len(prompt or []) + len(label or []))
    files = write_samples(out, x, items, base, cfg, rows)
    request = {
        **base,
        "prompts": prompt or [],
        "labels": label or [],
        "num": num,
        "seed": seed,
        "files": files,
    }
    write_json(out / "request.json", request)
    typer.echo(
        f"wrote {len(files)} samples to {out}"
        + (f" (grid: {out / 'grid.png'})" if cfg.model.dims == 2 else "")
    )


def regenerate(file: str | Path, model: str | Path | None = None, batch_size: int = 1):
    """Draw the sample recorded in a sample file's provenance again; returns (x (C, ...), provenance).

    Args:
        file: a PNG or WAV written by `attnlab sample`.
        model: the model directory, if it moved since (its weights must hash the same).

    Raises:
        CheckpointError: when the model directory is gone or its weights changed since.
    """
    from attnlab.cli.generate import Item, generate, text_encoder_for
    from attnlab.cli.outputs import read_provenance
    from attnlab.control.plan import sampling_plan
    from attnlab.train.checkpoint import file_sha256, load_model, model_dir

    meta = read_provenance(file)
    ckpt = Path(model) if model is not None else Path(meta["model_dir"])
    weights = model_dir(ckpt) / meta["weights"]
    if not weights.is_file() or file_sha256(weights) != meta["weights_sha256"]:
        raise CheckpointError(f"{weights}: missing or not the weights {file} was drawn with (sha256 differs)")
    net, cfg = load_model(ckpt, ema=meta["weights"].startswith("ema"))
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


def regenerate_command(
    file: Annotated[Path, typer.Argument(help="A PNG or WAV file written by `attnlab sample`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = ...,
    model: Annotated[
        Path | None, typer.Option("--model", help="The model directory, if it moved since (same weights).")
    ] = None,
):
    """Draw a sample again from the provenance in its file."""
    from attnlab.cli.outputs import save_png, save_wav
    from attnlab.train.checkpoint import model_dir, read_config

    x, meta = regenerate(file, model)
    out.mkdir(parents=True, exist_ok=True)
    target = out / Path(file).name
    if Path(file).suffix.lower() == ".wav":
        cfg = read_config(model_dir(model if model is not None else meta["model_dir"]))
        save_wav(target, x, cfg.data.sample_rate, meta)
    else:
        save_png(target, x, meta)
    typer.echo(f"wrote {target}")


def torch_threads(threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)


def register(app: typer.Typer) -> None:
    app.command("sample")(sample_command)
    app.command("regenerate")(regenerate_command)
