"""`attnlab poc`: run a proof of concept from a YAML config and write its report; rerun to resume."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer


def poc_command(
    config: Annotated[Path, typer.Argument(help="YAML PoC config (see examples/poc-shapes.yaml).")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value overrides, e.g. budget.train_steps=200 seeds=[0,1,2]."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="PoC directory; rerun the same command to resume.")
    ] = ...,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check the config and list what would run; train nothing.")
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = True,
):
    """Compare attention designs: train, sample and evaluate every variant, then write report.md/html.

    A config with a `pipeline` key (a local diffusers pipeline folder) compares training-free designs
    on that pretrained pipeline instead (examples/poc-pipeline.yaml)."""
    from attnlab.poc import load_poc_config, run_poc
    from attnlab.poc.pipeline import is_pipeline_config, load_pipeline_poc_config, run_pipeline_poc
    from attnlab.train.text import is_text_config

    if is_text_config(config):  # `modality: tokens`: the text PoC (masked diffusion on text)
        from attnlab.poc.text import run_text_poc

        if not dry_run:
            run_text_poc(config, out, overrides or [], log=typer.echo)
        return None
    on_pipeline = is_pipeline_config(config)
    if on_pipeline:
        cfg = load_pipeline_poc_config(config, overrides or [])
        run_poc = run_pipeline_poc  # noqa: F811  (the same call, on a pretrained pipeline)
    else:
        cfg = load_poc_config(config, overrides or [])
    if dry_run:
        if on_pipeline:
            from attnlab.poc.pipeline import prompt_set

            prompt_set(cfg)  # the prompts are readable
            for v in cfg.variants:
                typer.echo(f"{v.name}: samples the pipeline with {dict(v.techniques) or 'nothing added'}")
            return None
        return _dry_run(cfg, out)
    interrupted = []

    def on_sigint(signum, frame):
        interrupted.append(signum)  # kept even where Python swallows the exception (inside a __del__)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        results = run_poc(cfg, out, progress=progress)
    except KeyboardInterrupt:
        interrupted.append(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        typer.echo(
            f"interrupted: finished stages are kept in {out}; rerun the same command to resume", err=True
        )
        raise typer.Exit(code=130)
    for sentence in results["summary"]["sentences"]:
        typer.echo("- " + sentence.replace("**", "").replace("`", ""))
    typer.echo(f"report: {out / 'report.html'} (and report.md, results.json, results.csv)")


def _dry_run(cfg, out: Path) -> None:
    from attnlab.io import write_json
    from attnlab.poc.variants import model_owner, own_levels, sampling_spec

    write_json(out / "poc.json", cfg.to_dict())
    for v in cfg.variants:
        owner = model_owner(cfg, v).name
        levels = ", ".join(f"L{lv}" for lv in own_levels(cfg, v)) or "reference"
        model = "trains its model" if owner == v.name else f"samples {owner}'s model"
        spec = ", ".join(sampling_spec(cfg, v)) or "none"
        typer.echo(f"{v.name:<20} {levels:<10} {model:<28} sampling techniques: {spec}")
    seeds = cfg.training_seeds
    owners = len({model_owner(cfg, v).name for v in cfg.variants})
    typer.echo(
        f"training seeds: {', '.join(map(str, seeds))} ({owners} model(s) x {len(seeds)} = "
        f"{owners * len(seeds)} training run(s)); sampling seeds: {', '.join(map(str, cfg.seeds))}"
    )
    typer.echo(f"resolved config: {out / 'poc.json'}")


def register(app: typer.Typer) -> None:
    app.command("poc")(poc_command)
