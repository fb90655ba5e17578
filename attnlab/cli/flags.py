"""Sampling-time techniques on the command line: the `sample` command's shorthand flags and the
generic `--technique NAME[.option=value]`, which reaches every training-free technique by name;
and `--pipeline DIR` / `--device`, which point `sample`, `maps` and `edit` at a diffusers pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
import yaml

from attnlab.errors import ConfigError

PipelineDir = Annotated[
    Path | None,
    typer.Option(
        "--pipeline",
        help="A local diffusers pipeline folder (save_pretrained; SD, SDXL, PixArt, SD3, Flux) to sample "
        "instead of an attnlab run: local files only, safetensors only.",
    ),
]
Device = Annotated[str, typer.Option("--device", help="Where a --pipeline runs: cpu, cuda or cuda:N.")]


def technique_options(items: Sequence[str]) -> dict[str, dict]:
    """`["pag", "pag.scale=2", "tgate.layers=[mid]"]` -> {"pag": {"scale": 2}, "tgate": {"layers": ["mid"]}}.

    Values are read as YAML (numbers, booleans, lists); a bare name asks for the defaults.

    Raises:
        ConfigError: an item that is neither NAME nor NAME.option=value.
    """
    spec: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        name, dot, option = key.partition(".")
        if not name or (eq and not option) or (dot and not eq):
            raise ConfigError(f"--technique {item!r}: expected NAME or NAME.option=value (e.g. pag.scale=2)")
        opts = spec.setdefault(name, {})
        if eq:
            try:
                opts[option] = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"--technique {item!r}: {value!r} is not a valid value") from None
    return spec


def cli_spec(
    pag: float = 0.0,
    pag_layers: str | None = None,
    sag: float = 0.0,
    sag_layers: str | None = None,
    tgate: float | None = None,
    tgate_keep_cfg: bool = False,
    cache_every: int = 1,
) -> dict[str, dict]:
    """The spec the `sample` command's options ask for (off options are left out).

    T-GATE's spec always names drop_cfg, so a sample's provenance says whether guidance was dropped
    after the gate (the reference's default) or kept (`--tgate-keep-cfg`, a variant).
    """
    spec: dict[str, dict] = {}
    if pag:
        spec["pag"] = {"scale": pag, **({"layers": pag_layers} if pag_layers else {})}
    if sag:
        spec["sag"] = {"scale": sag, **({"layers": sag_layers} if sag_layers else {})}
    if tgate is not None:
        spec["tgate"] = {"gate": tgate, "drop_cfg": not tgate_keep_cfg}
    elif tgate_keep_cfg:
        raise ConfigError(
            "--tgate-keep-cfg needs --tgate GATE (the fraction of steps after which cross-attention is frozen)"
        )
    if cache_every > 1:
        spec["attn_cache"] = {"every": cache_every}
    return spec


def pipeline_or_run(run_dir, pipeline, device: str, **model_only) -> bool:
    """Whether a command samples a diffusers `--pipeline` (True) or an attnlab run directory (False).

    `model_only` are the flags that apply to attnlab models only (by option name, the value given:
    None or the default when not given; `ema` is given when False).

    Raises:
        ConfigError: both or neither given, a model-only flag with --pipeline, or --device without it.
    """
    if (run_dir is None) == (pipeline is None):
        raise ConfigError(
            "give a run directory (an attnlab model) or --pipeline DIR (a diffusers pipeline folder), not "
            + ("both" if run_dir is not None else "neither")
        )
    if pipeline is None:
        if device != "cpu":
            raise ConfigError(f"--device {device}: applies to --pipeline; attnlab models sample on the CPU")
        return False
    given = [name for name, value in model_only.items() if value not in (None, [], True)]
    if given:
        flag = "--no-ema" if given[0] == "ema" else f"--{given[0].replace('_', '-')}"
        raise ConfigError(
            f"{flag} applies to attnlab models; a --pipeline samples with its own scheduler and weights"
        )
    return True
