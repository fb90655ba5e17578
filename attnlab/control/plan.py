"""Sampling-time techniques by registry name: one spec -> installed controls, guidance terms, CFG schedule.

A spec is JSON-able ({"pag": {"scale": 3.0}, "tgate": {"gate": 0.4, "drop_cfg": true}}), so a
sample's provenance can carry it and the same sample can be drawn again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from attnlab.attention import Control, control
from attnlab.errors import ConfigError

NEEDS_PROMPTS = {
    "p2p": "attnlab edit",
    "attend_excite": "attnlab.control.AttendExcite.bind",
    "heatmaps": "attnlab maps",
}


@dataclass
class SamplingPlan:
    """Built sampling-time techniques: controls to install, guidance terms for the loop."""

    spec: dict[str, dict] = field(default_factory=dict)
    controls: list[Control] = field(default_factory=list)
    guidances: list = field(default_factory=list)

    def guidance(self, scale: float) -> float | Callable[[int, int], float]:
        """The loop's `guidance` argument: `scale`, or a per-step schedule when T-GATE drops CFG."""
        drops = [c for c in self.controls if getattr(c, "drop_cfg", False)]
        return drops[0].guidance_schedule(scale) if drops else scale

    @contextmanager
    def installed(self, model: nn.Module) -> Iterator[SamplingPlan]:
        with control(model, self.controls):
            yield self


def sampling_plan(spec: Mapping[str, Mapping | None] | None) -> SamplingPlan:
    """Build the training-free techniques named in `spec` (registry name -> options).

    Raises:
        ConfigError: an unknown name, an architectural technique, an unknown or bad option, or a
            technique that needs prompts bound first (use its own command).
    """
    from attnlab.techniques import get

    plan = SamplingPlan()
    for name, opts in (spec or {}).items():
        try:
            tech = get(name)
        except KeyError as e:
            raise ConfigError(str(e.args[0])) from None
        if not tech.training_free:
            raise ConfigError(
                f"technique {name!r} changes the architecture; set it in model.techniques and train"
            )
        if name in NEEDS_PROMPTS:
            raise ConfigError(f"technique {name!r} needs its prompts bound; use {NEEDS_PROMPTS[name]}")
        try:
            obj = tech.build(**dict(opts or {}))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"technique {name!r}: {e}") from None
        plan.spec[name] = dict(opts or {})
        if hasattr(obj, "correction"):
            plan.guidances.append(obj)
        else:
            plan.controls.append(obj)
    return plan


def cli_spec(
    pag: float = 0.0,
    pag_layers: str = "**",
    sag: float = 0.0,
    sag_layers: str = "**",
    tgate: float | None = None,
    tgate_drop_cfg: bool = False,
    cache_every: int = 1,
) -> dict[str, dict]:
    """The spec the `sample` command's options ask for (off options are left out)."""
    spec: dict[str, dict] = {}
    if pag:
        spec["pag"] = {"scale": pag, "layers": pag_layers}
    if sag:
        spec["sag"] = {"scale": sag, "layers": sag_layers}
    if tgate is not None:
        spec["tgate"] = {"gate": tgate, "drop_cfg": tgate_drop_cfg}
    elif tgate_drop_cfg:
        raise ConfigError(
            "--tgate-drop-cfg needs --tgate GATE (the fraction of steps after which CFG is dropped)"
        )
    if cache_every > 1:
        spec["attn_cache"] = {"every": cache_every}
    return spec
