"""`attnlab train`: train (or resume) a run from a YAML config with key=value overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def train_command(
    config: Annotated[Path, typer.Argument(help="YAML run config (see examples/).")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides, e.g. model.width=64 train.steps=500.")
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run directory; rerun the same command to resume.")
    ] = ...,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Check config, data and model and write config.json; do not train."),
    ] = False,
):
    """Train a diffusion model; rerunning the same command resumes from the last checkpoint."""
    from attnlab.config import load_config
    from attnlab.train.text import is_text_config
    from attnlab.train.trainer import Trainer

    if is_text_config(config):  # `modality: tokens`: masked diffusion on text
        from attnlab.cli.text import train_text_command

        return train_text_command(config, overrides or [], out, dry_run)
    trainer = Trainer(load_config(config, overrides or []), out)
    if dry_run:
        return _dry_run(trainer, out)
    trainer.run()


def _dry_run(trainer, out: Path) -> None:
    from attnlab.io import write_json
    from attnlab.train.checkpoint import latest_checkpoint

    trainer.data = trainer.build_data()
    trainer.settle_precision(latest_checkpoint(out))
    model, cfg = trainer.build_model(), trainer.cfg
    write_json(out / "config.json", cfg.to_dict())
    params = sum(p.numel() for p in model.parameters())
    typer.echo(
        f"{cfg.data.name}: {len(trainer.data)} items of shape {tuple(trainer.data.x.shape[1:])}; "
        f"{cfg.model.backbone} ({cfg.model.cond}-conditioned) with {params / 1e6:.2f}M parameters; "
        f"{cfg.train.steps} steps of {cfg.train.batch_size} in {cfg.train.precision}"
    )
    typer.echo(f"resolved config: {out / 'config.json'}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
