"""`attnlab sample` and `attnlab regenerate`: samples from a model directory, each file carrying the
provenance needed to draw it again."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from attnlab.cli.flags import Device, PipelineDir
from attnlab.errors import ConfigError
from attnlab.io import write_json

SAMPLER_NAMES = ("ddpm", "ddim", "dpm++")  # attnlab.diffusion.SAMPLERS, without importing diffusers here


def sample_command(
    run_dir: Annotated[
        Path | None,
        typer.Argument(help="A run directory (its latest checkpoint) or a checkpoint directory."),
    ] = None,
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
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision",
            help="fp32, bf16, fp16 (CUDA) or auto: bf16 where the CPU or GPU computes it natively "
            "(default: the run's sample.precision).",
        ),
    ] = None,
    pag: Annotated[float, typer.Option("--pag", help="Perturbed-attention guidance scale (0 = off).")] = 0.0,
    pag_layers: Annotated[
        str | None,
        typer.Option(
            "--pag-layers",
            help="Self-attention layers PAG perturbs (default: the mid block's, as diffusers).",
        ),
    ] = None,
    sag: Annotated[float, typer.Option("--sag", help="Self-attention guidance scale (0 = off).")] = 0.0,
    sag_layers: Annotated[
        str | None,
        typer.Option(
            "--sag-layers",
            help="Self-attention layers SAG's mask uses (default: the mid block's, as diffusers).",
        ),
    ] = None,
    tgate: Annotated[
        float | None,
        typer.Option(
            "--tgate",
            help="T-GATE: freeze cross-attention from this fraction of the steps and drop classifier-free "
            "guidance after it, as the T-GATE code does.",
        ),
    ] = None,
    tgate_keep_cfg: Annotated[
        bool,
        typer.Option(
            "--tgate-keep-cfg", help="T-GATE variant: keep classifier-free guidance after the gate."
        ),
    ] = False,
    cache_every: Annotated[
        int, typer.Option("--cache-every", min=1, help="Recompute attention every k steps, reuse in between.")
    ] = 1,
    technique: Annotated[
        list[str] | None,
        typer.Option(
            "--technique",
            "-t",
            help="Any training-free technique by name, NAME or NAME.option=value (e.g. -t pag.scale=2 "
            "-t tome.ratio=0.5); repeat for several (`attnlab techniques` lists them).",
        ),
    ] = None,
    pipeline: PipelineDir = None,
    device: Device = "cpu",
):
    """Draw samples: PNG files and a grid (images) or WAV files (audio), and request.json."""
    from attnlab.cli.flags import cli_spec, pipeline_or_run, technique_options
    from attnlab.control.plan import check_modality, sampling_plan
    from attnlab.generate import generate, plan, text_encoder_for
    from attnlab.precision import resolve as resolve_precision
    from attnlab.precision import set_precision
    from attnlab.samples import model_techniques, provenance_base, write_samples
    from attnlab.train.checkpoint import load_model, model_dir, weights_file
    from attnlab.train.text import is_text_run

    spec = cli_spec(pag, pag_layers, sag, sag_layers, tgate, tgate_keep_cfg, cache_every)
    for name, opts in technique_options(technique or ()).items():
        spec[name] = {**spec.get(name, {}), **opts}
    techniques = sampling_plan(spec)

    torch_threads(threads)
    if run_dir is not None and is_text_run(run_dir):  # a text run (`modality: tokens`): JSONL samples
        from attnlab.cli.text import sample_text_command

        return sample_text_command(
            run_dir,
            num=num,
            seed=seed,
            steps=steps,
            sampler=sampler,
            guidance=guidance,
            spec=spec,
            out=out,
            ema=ema,
            batch_size=batch_size,
        )
    if pipeline_or_run(run_dir, pipeline, device, label=label, sampler=sampler, ema=ema):
        return sample_pipeline(
            pipeline, prompt or [], num, seed, steps, guidance, precision, device, batch_size, techniques, out
        )
    model, cfg = load_model(run_dir, ema=ema)
    check_modality(techniques.spec, cfg.model)
    s = cfg.sample
    precision = resolve_precision(precision or s.precision, "cpu", "--precision")
    set_precision(model, precision)
    sampler, steps, guidance = (
        sampler or s.sampler,
        steps or s.steps,
        s.guidance if guidance is None else guidance,
    )
    if sampler not in SAMPLER_NAMES:
        raise ConfigError(f"--sampler {sampler!r} is not supported; choose one of {', '.join(SAMPLER_NAMES)}")
    output_dir(out)  # an unwritable --out fails now, not after sampling
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
        precision,
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
        f"wrote {len(items)} samples to {out}"
        + (f" (grid: {out / 'grid.png'})" if cfg.model.dims == 2 else "")
    )


def sample_pipeline(
    folder: Path,
    prompts: list[str],
    num: int,
    seed: int,
    steps: int | None,
    guidance: float | None,
    precision: str | None,
    device: str,
    batch_size: int,
    techniques,
    out: Path,
) -> None:
    """`sample --pipeline`: the pipeline's own call with the plan's controls, one PNG per sample."""
    from attnlab.generate import plan
    from attnlab.integrations.diffusers.host import check_family
    from attnlab.integrations.diffusers.load import (
        call_default,
        folder_family,
        generate,
        load_pipeline,
        provenance,
    )
    from attnlab.samples import grid, save_array_png, save_png, slug

    if not prompts:
        raise ConfigError("--pipeline samples text-to-image: give at least one --prompt")
    output_dir(out)
    controls = [*techniques.controls, *techniques.guidances]
    check_family(controls, folder_family(folder))  # before the weights load
    pipe = load_pipeline(folder, precision or "auto", device)
    steps = steps or call_default(pipe, "num_inference_steps")
    guidance = call_default(pipe, "guidance_scale") if guidance is None else guidance
    items = plan(prompts, [], num, seed)
    x = generate(
        pipe,
        [it.prompt for it in items],
        [it.seed for it in items],
        steps=steps,
        guidance=guidance,
        controls=controls,
        batch_size=batch_size,
    )
    base = provenance(folder, pipe, steps, guidance, techniques.spec, device)
    files = []
    for i, (xi, it) in enumerate(zip(x, items)):
        name = f"{i:03d}-{slug(it.prompt)}-seed{it.seed}.png"
        save_png(out / name, xi, {**base, "prompt": it.prompt, "seed": it.seed})
        files.append(name)
    save_array_png(out / "grid.png", grid(x, len(prompts)), {**base, "items": [vars(it) for it in items]})
    write_json(out / "request.json", {**base, "prompts": prompts, "num": num, "seed": seed, "files": files})
    typer.echo(f"wrote {len(files)} samples to {out} (grid: {out / 'grid.png'})")


def regenerate_command(
    file: Annotated[Path, typer.Argument(help="A PNG or WAV file written by `attnlab sample`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = ...,
    model: Annotated[
        Path | None, typer.Option("--model", help="The model directory, if it moved since (same weights).")
    ] = None,
):
    """Draw a sample again from the provenance in its file."""
    from attnlab.generate import regenerate
    from attnlab.samples import save_png, save_wav
    from attnlab.train.checkpoint import model_dir, read_config

    output_dir(out)
    _refuse_pipeline_sample(file)
    x, meta = regenerate(file, model)
    target = out / Path(file).name
    if Path(file).suffix.lower() == ".wav":
        cfg = read_config(model_dir(model if model is not None else meta["model_dir"]))
        save_wav(target, x, cfg.data.sample_rate, meta)
    else:
        save_png(target, x, meta)
    typer.echo(f"wrote {target}")


def _refuse_pipeline_sample(file: Path) -> None:
    """A sample drawn from a diffusers pipeline is drawn again with `sample --pipeline`."""
    from attnlab.errors import DataError
    from attnlab.samples import read_provenance

    try:
        meta = read_provenance(file)
    except DataError:
        return  # regenerate reports it
    if "pipeline" in meta:
        raise ConfigError(
            f"{file}: drawn from the diffusers pipeline {meta['pipeline']}; regenerate draws attnlab models' "
            f"samples, draw it again with `attnlab sample --pipeline {meta['pipeline']} -p PROMPT -n 1 "
            f"--seed {meta.get('seed')} --steps {meta.get('steps')} -g {meta.get('guidance')} "
            f"--precision {meta.get('precision')}` and its techniques"
        )


def output_dir(out: Path) -> Path:
    """Make `--out` and check a file can be written in it; one ConfigError if not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return out


def torch_threads(threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)


def register(app: typer.Typer) -> None:
    app.command("sample")(sample_command)
    app.command("regenerate")(regenerate_command)
