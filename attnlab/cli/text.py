"""`attnlab train` and `attnlab sample` on a text run (`modality: tokens`): MDLM training, and
samples as JSONL with the provenance of each line plus their metrics."""

from __future__ import annotations

from pathlib import Path

import typer

from attnlab.io import write_json


def train_text_command(config: Path, overrides: list[str], out: Path, dry_run: bool) -> None:
    from attnlab.train.text import load_text_config, train_text

    train_text(load_text_config(config, overrides), out, dry_run=dry_run, log=typer.echo)


def sample_text_command(
    run_dir: Path,
    *,
    num: int,
    seed: int,
    steps: int | None,
    sampler: str | None,
    guidance: float | None,
    spec: dict,
    out: Path,
    ema: bool,
    batch_size: int,
) -> None:
    """`num` samples conditioned on the eval split's items in order (seed + k for sample k):
    samples.jsonl (one JSON object a line, each with its provenance) and metrics.json."""
    from attnlab.train.text import draw_text, load_text_run, score_samples, write_jsonl

    run = load_text_run(run_dir, ema=ema)
    rows = draw_text(
        run,
        num,
        seed=seed,
        sampler=sampler,
        steps=steps,
        guidance=guidance,
        techniques=spec,
        batch_size=batch_size,
    )
    metrics = score_samples(run, rows)
    write_jsonl(out / "samples.jsonl", rows)
    write_json(out / "metrics.json", metrics)
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("valid", "agree", "gen_ppl") if k in metrics)
    typer.echo(f"wrote {len(rows)} samples to {out / 'samples.jsonl'} ({shown})")
