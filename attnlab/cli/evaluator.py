"""`attnlab evaluator`: train an evaluator network for a folder dataset, or describe one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

evaluator_app = typer.Typer(
    help="Evaluator networks: the feature and label readers behind FID/KID and alignment."
)


@evaluator_app.command("train")
def train_command(
    data_root: Annotated[
        Path, typer.Option("--data-root", help="Folder with metadata.jsonl or metadata.csv.")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory for evaluator.json + evaluator.safetensors.")
    ],
    size: Annotated[
        int, typer.Option(help="Image side in px (8-512) or audio length in samples (1024-8000).")
    ] = 32,
    sample_rate: Annotated[int, typer.Option(help="Audio folders: samples per second.")] = 8000,
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per step.")] = 64,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate.")] = 3e-3,
    seed: Annotated[int, typer.Option(help="Seeds the hold-out draw, initialisation and batches.")] = 0,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip unreadable rows and files.")] = False,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for torch.")] = 2,
):
    """Train an evaluator on a folder dataset (class head if labelled, else a pretext task).

    With labels it reads classes (alignment: class accuracy); without, it learns features by
    predicting a rotation (images) or time reversal (audio), for FID/KID only.
    """
    import torch

    from attnlab.data import DataConfig
    from attnlab.evaluate.evaluator import STEM
    from attnlab.evaluate.recipes import train_folder
    from attnlab.evaluate.train import TrainSettings

    torch.set_num_threads(threads)
    cfg = DataConfig(
        name="folder", root=str(data_root), size=size, sample_rate=sample_rate, seed=seed, skip_bad=skip_bad
    )
    settings = TrainSettings(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, log_every=max(1, steps // 10)
    )
    evaluator = train_folder(cfg, settings, log=typer.echo)
    config, weights = evaluator.save(out / STEM)
    typer.echo(f"evaluator: {config} + {weights.name}")


@evaluator_app.command("show")
def show_command(
    name: Annotated[
        str, typer.Argument(help="Built-in name (shapes, digits, tones) or evaluator directory.")
    ],
):
    """Print what an evaluator reads, what it was trained on and its held-out accuracy."""
    from attnlab.evaluate.evaluator import Evaluator

    ev = Evaluator.load(name)
    params = sum(p.numel() for p in ev.net.parameters())
    typer.echo(f"{ev.name}: {ev.task.kind} evaluator, {ev.info.get('modality')}, {params} parameters")
    typer.echo(f"features for FID/KID: {ev.net.num_features}-d")
    for key, values in ev.task.vocab.items():
        typer.echo(f"{key}: {', '.join(map(str, values))}")
    for split, metrics in ev.info.get("metrics", {}).items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
        typer.echo(f"held out {split}: {shown}")


def register(app: typer.Typer) -> None:
    app.add_typer(evaluator_app, name="evaluator")
