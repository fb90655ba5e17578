"""Sampling-time techniques by registry name: one spec -> installed controls, guidance terms, CFG schedule.

A spec is JSON-able ({"pag": {"scale": 3.0}, "tgate": {"gate": 0.4, "drop_cfg": true}}), so a
sample's provenance can carry it and the same sample can be drawn again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from attnlab.attention import Control, control
from attnlab.errors import ConfigError
from attnlab.techniques import get
from attnlab.techniques.registry import refusal_note


@dataclass
class SamplingPlan:
    """Built sampling-time techniques: controls to install, guidance terms for the loop.

    Attributes:
        spec: the techniques' options by name, as given.
        controls: attention-bus controls installed for the run.
        guidances: guidance terms of the sampling loop (`sample(guidances=...)`).
        per_batch: guidance terms that bind to each batch's prompts first (`for_prompts`).
        schedules: techniques that set the loop's CFG scale per step (T-GATE dropping CFG).
    """

    spec: dict[str, dict] = field(default_factory=dict)
    controls: list[Control] = field(default_factory=list)
    guidances: list = field(default_factory=list)
    per_batch: list = field(default_factory=list)
    schedules: list = field(default_factory=list)

    def guidance(self, scale: float) -> float | Callable[[int, int], float]:
        """The loop's `guidance` argument: `scale`, or a per-step schedule (T-GATE dropping CFG)."""
        out: float | Callable[[int, int], float] = scale
        for tech in self.schedules:
            out = tech.guidance_schedule(scale)
            if callable(out):
                return out
        return out

    def for_prompts(self, prompts: Sequence[str], encoder=None, words: Sequence[str] = ()) -> list:
        """The guidance terms of one batch: the plan's own, then the prompt-bound ones bound to `prompts`.

        Args:
            prompts: the batch's prompts, one per row.
            encoder: the text encoder that tokenised them.
            words: words to act on where a prompt holds them (Attend-and-Excite's objects).
        """
        bound = [tech.bind_prompts(list(prompts), encoder, tuple(words)) for tech in self.per_batch]
        return [*self.guidances, *bound]

    @contextmanager
    def installed(self, model: nn.Module) -> Iterator[SamplingPlan]:
        with control(model, self.controls):
            yield self


def sampling_plan(spec: Mapping[str, Mapping | None] | None, bind_prompts: bool = False) -> SamplingPlan:
    """Build the training-free techniques named in `spec` (registry name -> options).

    Args:
        spec: registry name -> options (None for the defaults).
        bind_prompts: the caller binds each batch's prompts (`SamplingPlan.for_prompts`, as the PoC
            does), so techniques that need prompts are accepted; otherwise they are refused.
    Raises:
        ConfigError: an unknown name, an architectural technique, an unknown or bad option, or a
            technique that needs prompts bound first (use its own command).
    """
    plan = SamplingPlan()
    for name, opts in (spec or {}).items():
        tech = _training_free(name, bind_prompts)
        try:
            obj = tech.build(**dict(opts or {}))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"technique {name!r}: {e}") from None
        plan.spec[name] = dict(opts or {})
        if tech.offers("controls"):
            plan.controls.append(obj)
        if tech.offers("cfg_schedule"):
            plan.schedules.append(obj)
        if tech.offers("bind_prompts"):
            plan.per_batch.append(obj)
        elif tech.offers("guidance"):
            plan.guidances.append(obj)
    return plan


def check_modality(spec: Mapping[str, Mapping | None] | None, model_cfg) -> None:
    """Refuse a technique of `spec` that does not declare the model's named modality ("points": the
    points backbone); image and audio models take every technique's defaults, as before.

    Raises:
        ConfigError: naming the technique and, where it gives one, why it does not take that data.
    """
    modality = model_cfg.modality
    if not isinstance(modality, str):
        return
    for name in spec or {}:
        tech = get(name)
        if modality not in tech.modalities:
            raise ConfigError(
                f"technique {name!r} does not take {modality} data{refusal_note(tech, modality)}"
            )


def _training_free(name: str, bind_prompts: bool):
    try:
        tech = get(name)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    if not tech.training_free:
        raise ConfigError(
            f"technique {name!r} changes the architecture; set it in model.techniques and train"
        )
    bindable = tech.offers("bind_prompts") or tech.offers("controls")
    if tech.needs_prompts and not (bind_prompts and bindable):
        raise ConfigError(f"technique {name!r} needs its prompts bound; use {tech.needs_prompts}")
    return tech
