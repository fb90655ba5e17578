"""`attnlab edit` (Prompt-to-Prompt, on samples or real images) and `attnlab maps` (per-word heat
maps) on a trained text model or a diffusers pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from attnlab.cli.flags import Device, PipelineDir
from attnlab.errors import ConfigError

RunDir = Annotated[
    Path | None, typer.Argument(help="A run directory (its latest checkpoint) or a checkpoint directory.")
]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]
Seed = Annotated[int, typer.Option("--seed", help="Noise seed (of the first sample).")]
Steps = Annotated[int | None, typer.Option("--steps", min=1, help="Sampling steps (default: the run's).")]
Sampler = Annotated[str | None, typer.Option("--sampler", help="ddpm, ddim or dpm++ (default: the run's).")]
Guidance = Annotated[
    float | None,
    typer.Option("--guidance", "-g", help="Classifier-free guidance scale (default: the run's)."),
]
Ema = Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA weights.")]
Threads = Annotated[int, typer.Option("--threads", help="torch CPU threads (0 = all cores).")]
Precision = Annotated[
    str | None,
    typer.Option(
        "--precision",
        help="With --pipeline: fp32, bf16, fp16 (CUDA) or auto, the weights' dtype (default auto).",
    ),
]


def _setup(
    run_dir: Path, ema: bool, sampler: str | None, steps: int | None, guidance: float | None, threads: int
):
    """The model, its config, a text encoder, a scheduler and the resolved sampling settings."""
    from attnlab.cli.sample import torch_threads
    from attnlab.conditioning import get_text_encoder
    from attnlab.diffusion import SAMPLERS, scheduler_for
    from attnlab.train.checkpoint import load_model

    torch_threads(threads)
    model, cfg = load_model(run_dir, ema=ema)
    if cfg.model.cond != "text":
        raise ConfigError(
            f"{run_dir}: model.cond is {cfg.model.cond!r}; editing and heat maps need a text model"
        )
    s = cfg.sample
    sampler, steps = sampler or s.sampler, steps or s.steps
    guidance = s.guidance if guidance is None else guidance
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {sampler!r} is not supported; choose one of {', '.join(SAMPLERS)}")
    settings = {"sampler": sampler, "steps": steps, "guidance": guidance}
    return model, cfg, get_text_encoder(), scheduler_for(cfg, sampler), cfg.model.sample_shape(), settings


def _mode(mode: str | None, encoder, prompt: str, edits: list[str]) -> str:
    """--mode, or by default: replace when every edit has the source's token count, else refine."""
    if mode is not None:
        return mode
    n = len(encoder.tokens_of(prompt))
    return "replace" if all(len(encoder.tokens_of(e)) == n for e in edits) else "refine"


def _save_sample(path: Path, x, cfg, meta: dict) -> str:
    from attnlab.samples import save_png, save_wav

    if cfg.model.dims == 1:
        save_wav(path.with_suffix(".wav"), x, cfg.data.sample_rate, meta)
        return path.with_suffix(".wav").name
    save_png(path.with_suffix(".png"), x, meta)
    return path.with_suffix(".png").name


def edit_command(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The source prompt.")],
    edit: Annotated[list[str], typer.Option("--edit", "-e", help="An edited prompt; repeat for several.")],
    out: Out,
    mode: Annotated[
        str | None,
        typer.Option(
            "--mode",
            help="replace, refine or reweight (default: replace if token counts match, else refine).",
        ),
    ] = None,
    word: Annotated[
        str | None, typer.Option("--word", help="reweight: the word whose attention is scaled.")
    ] = None,
    factor: Annotated[
        float, typer.Option("--factor", help="reweight: the attention factor (1 = unchanged).")
    ] = 1.0,
    blend: Annotated[
        list[str] | None, typer.Option("--blend", help="Local blend: a word whose region may change; repeat.")
    ] = None,
    blend_threshold: Annotated[
        float, typer.Option("--blend-threshold", help="Local blend mask threshold.")
    ] = 0.3,
    cross_steps: Annotated[
        float, typer.Option("--cross-steps", help="Fraction of the steps with cross-attention injected.")
    ] = 0.8,
    self_steps: Annotated[
        float, typer.Option("--self-steps", help="Fraction of the steps with self-attention injected.")
    ] = 0.4,
    layers: Annotated[str, typer.Option("--layers", help="Layer name pattern the injection acts on.")] = "**",
    num: Annotated[int, typer.Option("--num", "-n", min=1, help="Number of seeds: seed, seed + 1, ...")] = 1,
    seed: Seed = 0,
    steps: Steps = None,
    sampler: Sampler = None,
    guidance: Guidance = None,
    ema: Ema = True,
    threads: Threads = 0,
    run_dir: RunDir = None,
    pipeline: PipelineDir = None,
    device: Device = "cpu",
    precision: Precision = None,
    image: Annotated[
        Path | None,
        typer.Option("--image", help="Edit this real image (its caption is --prompt): invert it, then edit."),
    ] = None,
    inversion: Annotated[
        str,
        typer.Option("--inversion", help="With --image: ddim, null-text or ddpm (edit-friendly, exact)."),
    ] = "ddpm",
    mask: Annotated[
        Path | None,
        typer.Option("--mask", help="With --image: white marks the only region the edit may change."),
    ] = None,
    null_tokens: Annotated[
        str,
        typer.Option(
            "--null-tokens",
            help="With --inversion null-text on a run: optimise a null token at every caption position "
            "(all, the paper's) or the null condition's single token (one).",
        ),
    ] = "all",
):
    """Edit a sample with Prompt-to-Prompt: source and edits from the same noise, written side by side.
    With --image, edit a real image: it is inverted under --prompt first, and edited from that noise."""
    from attnlab.cli.flags import pipeline_or_run
    from attnlab.control import PromptToPrompt
    from attnlab.control.edit import edit as run_edit
    from attnlab.control.figures import side_by_side, waves_side_by_side
    from attnlab.io import write_json
    from attnlab.samples import save_png, slug

    if mode != "reweight" and (word is not None or factor != 1.0):
        raise ConfigError("--word and --factor apply to --mode reweight only")
    if image is None and (mask is not None or inversion != "ddpm"):
        raise ConfigError("--inversion and --mask apply to a real image: give --image PHOTO.png")
    if null_tokens != "all" and inversion != "null-text":
        raise ConfigError("--null-tokens applies to --inversion null-text")
    if image is not None and (num != 1 or sampler not in (None, "ddim")):
        raise ConfigError(
            "--image edits one image with the DDIM sampler its inversion is made for (drop --num/--sampler)"
        )
    on_pipeline = pipeline_or_run(run_dir, pipeline, device, sampler=sampler, ema=ema)
    if on_pipeline:
        from attnlab.cli.sample import output_dir, torch_threads
        from attnlab.integrations.diffusers.load import call_default, load_pipeline, provenance
        from attnlab.integrations.diffusers.words import edit as edit_pipeline
        from attnlab.integrations.diffusers.words import real_token_count

        torch_threads(threads)
        output_dir(out)
        pipe = load_pipeline(pipeline, precision or "auto", device)
        if mode is None:  # replace when every edit has the source's token count, else refine
            n = real_token_count(pipe, prompt)
            mode = "replace" if all(real_token_count(pipe, e) == n for e in edit) else "refine"
        steps = steps or call_default(pipe, "num_inference_steps")
        guidance = call_default(pipe, "guidance_scale") if guidance is None else guidance
    else:
        if precision is not None:
            raise ConfigError("--precision applies to --pipeline; attnlab models edit in their own precision")
        model, cfg, encoder, scheduler, shape, settings = _setup(
            run_dir, ema, sampler, steps, guidance, threads
        )
        mode = _mode(mode, encoder, prompt, edit)
    p2p = PromptToPrompt(
        mode=mode,
        word=word,
        factor=factor,
        blend=tuple(blend or ()),
        blend_threshold=blend_threshold,
        cross_end=cross_steps,
        self_end=self_steps,
        layers=layers,
    )
    options = {
        "mode": mode,
        "word": word,
        "factor": factor,
        "blend": list(blend or []),
        "cross_steps": cross_steps,
        "self_steps": self_steps,
        "layers": layers,
        "blend_threshold": blend_threshold,
    }
    if on_pipeline:
        settings = provenance(pipeline, pipe, steps, guidance, {"p2p": options}, device)
        base_info = {}
    else:
        base_info = {"run_dir": str(run_dir)}
    if image is not None:
        from attnlab.cli.real_edit import edit_real

        target = pipe if on_pipeline else (model, cfg, encoder, scheduler, settings)
        real = dict(image=image, mask=mask, inversion=inversion, seed=seed, out=out, null_tokens=null_tokens)
        return edit_real(target, prompt, edit, p2p, options, {**base_info, **settings}, **real)
    titles = ["source: " + prompt, *[f"edit {k + 1}: {e}" for k, e in enumerate(edit)]]
    files = []
    for s in range(seed, seed + num):
        if on_pipeline:
            x = edit_pipeline(pipe, prompt, edit, p2p, seed=s, steps=steps, guidance=guidance)
        else:
            x = run_edit(
                model,
                encoder,
                prompt,
                edit,
                p2p,
                shape=shape,
                scheduler=scheduler,
                steps=settings["steps"],
                guidance=settings["guidance"],
                seed=s,
            )
        x = x.clamp(-1, 1).cpu()
        base = {**base_info, "source": prompt, "edits": edit, "seed": s, "p2p": options, **settings}

        def save(path, img, meta):
            if on_pipeline:
                return save_png(path.with_suffix(".png"), img, meta).name
            return _save_sample(path, img, cfg, meta)

        names = [save(out / f"seed{s}-source", x[0], {**base, "prompt": prompt})]
        for k, e in enumerate(edit):
            names.append(save(out / f"seed{s}-edit{k + 1}-{slug(e)}", x[k + 1], {**base, "prompt": e}))
        side = out / f"seed{s}-side-by-side.png"
        if not on_pipeline and cfg.model.dims == 1:
            waves_side_by_side(side, list(x), titles, cfg.data.sample_rate)
        else:
            side_by_side(side, list(x), titles)
        files += [*names, side.name]
    write_json(
        out / "edit.json",
        {
            **base_info,
            "source": prompt,
            "edits": edit,
            "seeds": list(range(seed, seed + num)),
            "p2p": options,
            **settings,
            "files": files,
        },
    )
    typer.echo(f"wrote {len(files)} files to {out} (mode {mode})")


def maps_command(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt to sample and explain.")],
    out: Out,
    word: Annotated[
        list[str] | None, typer.Option("--word", "-w", help="A word to map; repeat (default: every word).")
    ] = None,
    layers: Annotated[
        str, typer.Option("--layers", help="Cross-attention layer name pattern to aggregate.")
    ] = "**",
    start: Annotated[float, typer.Option("--start", help="Aggregate from this fraction of the steps.")] = 0.0,
    end: Annotated[float, typer.Option("--end", help="Aggregate up to this fraction of the steps.")] = 1.0,
    seed: Seed = 0,
    steps: Steps = None,
    sampler: Sampler = None,
    guidance: Guidance = None,
    ema: Ema = True,
    threads: Threads = 0,
    run_dir: RunDir = None,
    pipeline: PipelineDir = None,
    precision: Precision = None,
    device: Device = "cpu",
):
    """Sample a prompt and write a heat map per word over it (DAAM): overlays for images, curves for audio, coloured points for clouds."""
    from attnlab.cli.flags import pipeline_or_run
    from attnlab.control import HeatMaps
    from attnlab.control.explain import explain

    hm = HeatMaps(layers=layers, start=start, end=end)
    if pipeline_or_run(run_dir, pipeline, device, sampler=sampler, ema=ema):
        return _maps_pipeline(
            pipeline, prompt, word, hm, out, seed, steps, guidance, precision, device, threads
        )
    if precision is not None:
        raise ConfigError(
            "--precision applies to --pipeline; an attnlab run's heat maps are computed in fp32"
        )
    model, cfg, encoder, scheduler, shape, settings = _setup(run_dir, ema, sampler, steps, guidance, threads)
    x, maps = explain(
        model,
        encoder,
        prompt,
        word or None,
        shape=shape,
        scheduler=scheduler,
        steps=settings["steps"],
        guidance=settings["guidance"],
        seed=seed,
        heatmaps=hm,
    )
    meta = {
        "run_dir": str(run_dir),
        "prompt": prompt,
        "seed": seed,
        "layers": layers,
        "window": [start, end],
        **settings,
    }
    if cfg.model.backbone == "points":
        return _write_cloud_maps(out, x.cpu(), maps, meta)
    _write_maps(out, x.clamp(-1, 1).cpu(), maps, meta, cfg.data.sample_rate if cfg.model.dims == 1 else None)


def _maps_pipeline(folder, prompt, words, hm, out, seed, steps, guidance, precision, device, threads) -> None:
    """`maps --pipeline`: the pipeline's own call with heat maps installed through the host."""
    from attnlab.cli.sample import output_dir, torch_threads
    from attnlab.integrations.diffusers.load import call_default, load_pipeline, provenance
    from attnlab.integrations.diffusers.words import explain

    torch_threads(threads)
    output_dir(out)
    pipe = load_pipeline(folder, precision or "auto", device)
    steps = steps or call_default(pipe, "num_inference_steps")
    guidance = call_default(pipe, "guidance_scale") if guidance is None else guidance
    x, maps = explain(pipe, prompt, words or None, seed=seed, steps=steps, guidance=guidance, heatmaps=hm)
    spec = {"heatmaps": {"layers": list(hm.layers), "start": hm.start, "end": hm.end}}
    meta = {
        **provenance(folder, pipe, steps, guidance, spec, device),
        "prompt": prompt,
        "seed": seed,
        "layers": list(hm.layers),
        "window": [hm.start, hm.end],
    }
    _write_maps(out, x, maps, meta, None)


def _write_maps(out: Path, x, maps: dict, meta: dict, sample_rate: int | None) -> None:
    """The sample with its provenance, an overlay (images) or curves (audio, `sample_rate`) per word
    and of all words, the maps as safetensors and maps.json."""
    from attnlab.control.figures import heat_curves, heat_overlays
    from attnlab.samples import save_png, save_wav

    prompt = meta["prompt"]

    def figure(path, m):
        return (
            heat_overlays(path, x, m, prompt)
            if sample_rate is None
            else heat_curves(path, x, m, sample_rate, prompt)
        )

    out.mkdir(parents=True, exist_ok=True)
    if sample_rate is None:
        files = [save_png(out / "sample.png", x, meta).name]
    else:
        files = [save_wav(out / "sample.wav", x, sample_rate, meta).name]
    _write_figures(out, files, maps, meta, figure)


def _write_cloud_maps(out: Path, x, maps: dict, meta: dict) -> None:
    """As `_write_maps` for a point cloud: the sample as PLY and preview, each word's per-point map
    on the cloud's previews."""
    from attnlab.control.figures import heat_clouds
    from attnlab.samples import save_points

    out.mkdir(parents=True, exist_ok=True)
    files = save_points(out, "sample", x, meta, meta["prompt"])
    _write_figures(out, files, maps, meta, lambda path, m: heat_clouds(path, x, m, meta["prompt"]))


def _write_figures(out: Path, files: list[str], maps: dict, meta: dict, figure) -> None:
    """A figure per word and of all words, the maps as safetensors and maps.json."""
    from safetensors.torch import save_file

    from attnlab.io import atomic_path, write_json
    from attnlab.samples import slug

    for w, m in maps.items():
        files.append(figure(out / f"map-{slug(w)}.png", {w: m}).name)
    both = figure(out / "maps.png", maps)
    with atomic_path(out / "heatmaps.safetensors") as tmp:
        save_file({w: m.contiguous().float().cpu() for w, m in maps.items()}, str(tmp))
    write_json(
        out / "maps.json", {**meta, "words": list(maps), "files": [*files, both.name, "heatmaps.safetensors"]}
    )
    typer.echo(f"wrote heat maps of {len(maps)} words to {out} ({both})")


def register(app: typer.Typer) -> None:
    app.command("edit")(edit_command)
    app.command("maps")(maps_command)
