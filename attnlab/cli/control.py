"""`attnlab edit` (Prompt-to-Prompt) and `attnlab maps` (per-word heat maps) on a trained text model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from attnlab.errors import ConfigError

RunDir = Annotated[
    Path, typer.Argument(help="A run directory (its latest checkpoint) or a checkpoint directory.")
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
    run_dir: RunDir,
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
):
    """Edit a sample with Prompt-to-Prompt: source and edits from the same noise, written side by side."""
    from attnlab.control import PromptToPrompt
    from attnlab.control.edit import edit as run_edit
    from attnlab.control.figures import side_by_side, waves_side_by_side
    from attnlab.io import write_json
    from attnlab.samples import slug

    if mode != "reweight" and (word is not None or factor != 1.0):
        raise ConfigError("--word and --factor apply to --mode reweight only")
    model, cfg, encoder, scheduler, shape, settings = _setup(run_dir, ema, sampler, steps, guidance, threads)
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
    titles = ["source: " + prompt, *[f"edit {k + 1}: {e}" for k, e in enumerate(edit)]]
    files = []
    for s in range(seed, seed + num):
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
        base = {
            "run_dir": str(run_dir),
            "source": prompt,
            "edits": edit,
            "seed": s,
            "p2p": options,
            **settings,
        }
        names = [_save_sample(out / f"seed{s}-source", x[0], cfg, {**base, "prompt": prompt})]
        for k, e in enumerate(edit):
            names.append(
                _save_sample(out / f"seed{s}-edit{k + 1}-{slug(e)}", x[k + 1], cfg, {**base, "prompt": e})
            )
        side = out / f"seed{s}-side-by-side.png"
        if cfg.model.dims == 1:
            waves_side_by_side(side, list(x), titles, cfg.data.sample_rate)
        else:
            side_by_side(side, list(x), titles)
        files += [*names, side.name]
    write_json(
        out / "edit.json",
        {
            "run_dir": str(run_dir),
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
    run_dir: RunDir,
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
):
    """Sample a prompt and write a heat map per word over it (DAAM): overlays for images, curves for audio."""
    from safetensors.torch import save_file

    from attnlab.control import HeatMaps
    from attnlab.control.explain import explain
    from attnlab.control.figures import heat_curves, heat_overlays
    from attnlab.io import atomic_path, write_json
    from attnlab.samples import slug

    model, cfg, encoder, scheduler, shape, settings = _setup(run_dir, ema, sampler, steps, guidance, threads)
    hm = HeatMaps(layers=layers, start=start, end=end)
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
    x = x.clamp(-1, 1).cpu()
    meta = {
        "run_dir": str(run_dir),
        "prompt": prompt,
        "seed": seed,
        "layers": layers,
        "window": [start, end],
        **settings,
    }
    files = [_save_sample(out / "sample", x, cfg, meta)]
    for w, m in maps.items():
        path = out / f"map-{slug(w)}.png"
        if cfg.model.dims == 1:
            heat_curves(path, x, {w: m}, cfg.data.sample_rate, prompt)
        else:
            heat_overlays(path, x, {w: m}, prompt)
        files.append(path.name)
    both = out / "maps.png"
    heat_curves(both, x, maps, cfg.data.sample_rate, prompt) if cfg.model.dims == 1 else heat_overlays(
        both, x, maps, prompt
    )
    with atomic_path(out / "heatmaps.safetensors") as tmp:
        save_file({w: m.contiguous().float().cpu() for w, m in maps.items()}, str(tmp))
    write_json(
        out / "maps.json", {**meta, "words": list(maps), "files": [*files, both.name, "heatmaps.safetensors"]}
    )
    typer.echo(f"wrote heat maps of {len(maps)} words to {out} ({both})")


def register(app: typer.Typer) -> None:
    app.command("edit")(edit_command)
    app.command("maps")(maps_command)
