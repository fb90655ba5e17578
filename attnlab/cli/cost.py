"""`attnlab cost`: parameters, FLOPs per denoiser call and peak memory of a model config, untrained."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def cost_command(
    config: Annotated[Path, typer.Argument(help="YAML run config (see examples/).")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value overrides, e.g. model.techniques.tome.ratio=0.5."),
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Samples per training step and sampling step.")] = 16,
    memory: Annotated[
        bool, typer.Option("--memory/--no-memory", help="Measure peak memory (runs two steps).")
    ] = True,
    text_tokens: Annotated[int, typer.Option(min=1, help="Tokens per text condition.")] = 8,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the numbers here.")] = None,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for torch.")] = 2,
):
    """Cost of the model a config describes: parameters, GFLOPs of one denoiser call on one sample,
    and peak memory of a training step and of a (classifier-free-guided) sampling step."""
    import torch

    from attnlab.config import load_config
    from attnlab.io import write_json
    from attnlab.models import build_model
    from attnlab.models.cost import model_cost

    torch.set_num_threads(threads)
    cfg = load_config(config, overrides or [])
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    result = model_cost(model, cfg.model, batch=batch, memory=memory, text_tokens=text_tokens)
    techniques = ", ".join(cfg.model.techniques) or "none"
    typer.echo(
        f"{cfg.model.backbone} on {cfg.data.name} {cfg.model.sample_shape()}, techniques: {techniques}"
    )
    for line in format_cost(result, batch):
        typer.echo(line)
    if json_out is not None:
        write_json(json_out, {"config": cfg.to_dict(), "batch": batch, **result})
        typer.echo(f"written: {json_out}")


def format_cost(result: dict, batch: int) -> list[str]:
    """The cost record as aligned `name  value` lines."""
    rows = [
        ("parameters", f"{result['params'] / 1e6:.3f} M"),
        ("GFLOPs / denoiser call", f"{result['gflops_per_call']:.4f} (one sample)"),
    ]
    if "train_step_peak_bytes" in result:
        rows.append(
            ("peak memory, training step", f"{_mib(result['train_step_peak_bytes'])} (batch {batch})")
        )
        rows.append(
            ("peak memory, sampling step", f"{_mib(result['sample_step_peak_bytes'])} (batch {batch}, CFG)")
        )
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {v}" for k, v in rows]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def register(app: typer.Typer) -> None:
    app.command("cost")(cost_command)
