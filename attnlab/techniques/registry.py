"""The technique contract: every attention design declares, once and in its own file, what it is and
what it provides; hosts (the backbones, the sampling plan, the PoC, the CLI) read only the declaration.

A technique is a dataclass of its options, registered with `@register`. Its declaration says:

- `level` (1-5, see LEVELS), `paper`, `summary`: what it is, for the registry table and the reports;
- `training_free`: whether it acts on a trained model at sampling time (else it changes the
  architecture, and a model is trained with it; token merging is both);
- `hosts` and `modalities`: the backbones ("unet", "dit") and data dimensionalities (1 = audio,
  2 = images) it works in; anything else is refused from this declaration. "points" (3D point
  clouds, on the points backbone) is a modality a technique opts into explicitly, and one that does
  not says why in `modality_notes` ({"points": "why not"}), which refusals print; "tokens" (text,
  on the tokens backbone, `attnlab.models.tokens`) likewise; `pipelines`: the
  diffusers pipeline families (PIPELINES) a training-free technique runs on through the diffusers
  host (all of them unless it says otherwise, with `pipelines_note` saying why);
- `provides`: the hook points it fills, each a method of the options class (see HOOKS). The
  backbones ask the resolved model plan (`attnlab.models.plan`) for a hook point; the sampling plan
  (`attnlab.control.plan`) asks for controls, guidance terms and CFG schedules. No host ever names a
  technique or probes it with `hasattr`;
- `needs_prompts`: where to use it when it needs its prompts bound first (editing, heat maps,
  Attend-and-Excite), which the plain sampling plan refuses; `needs_text`: it reads cross-attention,
  so the model must be text-conditioned; `not_in_poc`: why a PoC cannot compare it, if it cannot.

Adding a technique touches one new file and one line of `PROVIDERS` below. For example, a
sampling-time control that scales every cross-attention output::

    # attnlab/control/cross_gain.py, and "cross_gain" added to the attnlab.control providers
    @register(
        "cross_gain",
        level=5,
        paper="(the paper, arXiv id)",
        training_free=True,
        summary="scale cross-attention outputs: stronger or weaker prompt adherence, no extra cost",
        provides=("controls",),
    )
    @dataclass(eq=False)
    class CrossGain(Control):
        gain: float = 1.0
        kind = "cross"

        def after(self, call: AttnCall, out: Tensor) -> Tensor:
            return self.gain * out

It is then listed by `attnlab techniques`, sampled with `attnlab sample -t cross_gain.gain=1.5`,
accepted by a PoC variant (`techniques: {cross_gain: {gain: 1.5}}`) and covered by the contract tests.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any

LEVELS = {
    1: "input: data and conditions into tokens",
    2: "internal: attention blocks inside the backbone",
    3: "time: how the timestep shapes attention",
    4: "cross-scale: attention between resolutions",
    5: "output: re-adjusting samples at sampling time",
}

HOSTS = ("unet", "dit")
MODALITIES = (1, 2)
# Modalities a technique declares explicitly (never by default), each with the backbone it runs on.
EXPLICIT_MODALITIES = {"points": "points", "tokens": "tokens"}
# The diffusers pipeline families the diffusers host runs training-free techniques on
# (`attnlab.integrations.diffusers`).
PIPELINES = ("sd", "sdxl", "pixart", "sd3", "flux")

# Hook points: a technique that provides one defines the method of that name.
BACKBONE_HOOKS = {
    "check": "check(model_cfg): refuse options that do not fit the model (sizes, blocks, other techniques)",
    "edit_spec": "edit_spec(spec, where) -> AttnSpec: change one attention block (kernel, sub-layers, ...)",
    "res_block": "res_block() -> ResBlock class: the U-Net's residual block (how the timestep enters)",
    "skip_gate": "skip_gate(model_cfg, size, skip_ch, gate_ch) -> module | None: gate a U-Net skip map",
    "cross_scale": "cross_scale(model_cfg, size, dim) -> module | None: a layer reading other encoder scales",
    "unet_positions": "unet_positions(grid, dim) -> module: positions added to a U-Net attention block's tokens",
    "dit_positions": "dit_positions(grid, dim) -> table | None: the DiT's patch-token positions",
    "input_layer": "input_layer(in_ch, out_ch, conv) -> module: an extra input added to the stem's map",
    "time_input": "time_input(dim) -> module | None: the DiT's timestep put into the tokens",
    "condition_tokens": "condition_tokens(vec, tokens, mask) and join(h, cond): the condition as tokens",
    "run_blocks": "run_blocks(depth, dim) -> module: how the DiT runs its blocks (long skips)",
    "training_condition": "training_condition(x0, cond, generator) -> Condition: what training feeds",
    "attach": "attach(model): bus controls the model carries for its whole life",
}
SAMPLING_HOOKS = {
    "controls": "the options object is an attention-bus Control installed for the sampling run",
    "guidance": "the options object is a guidance term (controls, active, correction) of the sampling loop",
    "cfg_schedule": "guidance_schedule(scale) -> float | (i, steps) -> float: the loop's CFG scale",
    "bind_prompts": "bind_prompts(prompts, encoder, words) -> guidance: bound to one batch's prompts",
}
HOOKS = {**BACKBONE_HOOKS, **SAMPLING_HOOKS}
# Hook points of which a model can have one provider only (the backbone has one slot for it).
SINGLE_SLOT = ("res_block", "dit_positions", "input_layer", "time_input", "condition_tokens", "run_blocks")
_METHODS = {
    "condition_tokens": ("condition_tokens", "join"),
    "controls": ("select", "active"),
    "guidance": ("controls", "active", "correction"),
    "cfg_schedule": ("guidance_schedule",),
}


@dataclass(frozen=True)
class Technique:
    """One registered attention design (see the module docstring for what each field declares).

    Attributes:
        name: registry key, used in configs and on the command line.
        options: the options dataclass; an instance of it is what hosts call hooks on.
        defaults: each option's default, read off the dataclass.
    """

    name: str
    level: int
    paper: str
    training_free: bool
    summary: str
    options: type
    provides: frozenset[str]
    hosts: tuple[str, ...] = HOSTS
    modalities: tuple[int, ...] = MODALITIES
    needs_prompts: str | None = None
    needs_text: bool = False
    not_in_poc: str | None = None
    pipelines: tuple[str, ...] = ()
    pipelines_note: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    modality_notes: dict[str, str] = field(default_factory=dict)

    @property
    def architectural(self) -> bool:
        """Whether a model can be built with it (it fills backbone hook points)."""
        return bool(self.provides & (BACKBONE_HOOKS.keys() - {"check"}))

    def build(self, **overrides):
        """The options object: the defaults updated by `overrides`.

        Raises:
            ValueError: an option the technique does not have (the message lists its options).
        """
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise ValueError(
                f"technique {self.name!r} has no option(s) {sorted(unknown)}; options: {sorted(self.defaults)}"
            )
        return self.options(**{**self.defaults, **overrides})

    def offers(self, hook: str) -> bool:
        return hook in self.provides


REGISTRY: dict[str, Technique] = {}


def register(
    name: str,
    *,
    level: int,
    paper: str,
    training_free: bool,
    summary: str,
    provides: tuple[str, ...],
    hosts: tuple[str, ...] = HOSTS,
    modalities: tuple[int, ...] = MODALITIES,
    needs_prompts: str | None = None,
    needs_text: bool = False,
    not_in_poc: str | None = None,
    pipelines: tuple[str, ...] | None = None,
    pipelines_note: str | None = None,
    modality_notes: dict[str, str] | None = None,
):
    """Class decorator that declares a technique; the class's dataclass fields are its options.

    Raises:
        ValueError: a bad level, host or modality, an unknown hook point, a hook whose method the
            class lacks, or a name registered twice.
    """
    _require(level in LEVELS, name, f"level must be one of {sorted(LEVELS)}, got {level}")
    _require(set(hosts) <= set(HOSTS), name, f"hosts must be among {HOSTS}, got {hosts}")
    known = (*MODALITIES, *EXPLICIT_MODALITIES)
    _require(set(modalities) <= set(known), name, f"modalities must be among {known}")
    notes = dict(modality_notes or {})
    _require(
        set(notes) <= set(EXPLICIT_MODALITIES), name, f"modality_notes are for {tuple(EXPLICIT_MODALITIES)}"
    )
    _require(not set(notes) & set(modalities), name, "a modality it declares needs no note why not")
    unknown = set(provides) - HOOKS.keys()
    _require(not unknown, name, f"unknown hook point(s) {sorted(unknown)}; known: {', '.join(HOOKS)}")
    _require(bool(provides), name, "provides no hook point")
    pipelines = (PIPELINES if training_free else ()) if pipelines is None else tuple(pipelines)
    _require(set(pipelines) <= set(PIPELINES), name, f"pipelines must be among {PIPELINES}, got {pipelines}")
    _require(
        training_free or not pipelines, name, "an architectural technique runs on no pretrained pipeline"
    )

    def deco(cls):
        _require(name not in REGISTRY, name, "is registered twice")
        missing = [m for h in provides for m in _METHODS.get(h, (h,)) if not callable(getattr(cls, m, None))]
        _require(not missing, name, f"declares hook point(s) without their method(s): {missing}")
        REGISTRY[name] = Technique(
            name,
            level,
            paper,
            training_free,
            summary,
            cls,
            frozenset(provides),
            tuple(hosts),
            tuple(modalities),
            needs_prompts,
            needs_text,
            not_in_poc,
            pipelines,
            pipelines_note,
            defaults=_defaults(cls),
            modality_notes=notes,
        )
        return cls

    return deco


def fits(tech: Technique, backbone: str) -> bool:
    """Whether the technique runs in `backbone`: a declared host, or the backbone of a modality it
    declares explicitly (the points backbone for "points")."""
    explicit = [m for m in tech.modalities if m in EXPLICIT_MODALITIES]
    if backbone in EXPLICIT_MODALITIES.values():
        return any(EXPLICIT_MODALITIES[m] == backbone for m in explicit)
    return backbone in tech.hosts


def modality_names(modalities) -> str:
    """ "1D/2D", "2D/points": how tables and messages name modalities."""
    return "/".join(m if isinstance(m, str) else f"{m}D" for m in modalities)


def refusal_note(tech: Technique, modality) -> str:
    """ " (on points: why not)" when the technique says why it does not take `modality`, else ""."""
    note = tech.modality_notes.get(modality) if isinstance(modality, str) else None
    return f" (on {modality}: {note})" if note else ""


def get(name: str) -> Technique:
    """The registered technique `name`.

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    load_all()
    if name not in REGISTRY:
        raise KeyError(f"unknown technique {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def techniques(level: int | None = None) -> list[Technique]:
    """Every registered technique (of one level), ordered by level, then name."""
    load_all()
    return sorted((t for t in REGISTRY.values() if level in (None, t.level)), key=lambda t: (t.level, t.name))


def load_all() -> None:
    """Import the modules that register techniques (lazy, so the registry has no import cycles)."""
    for module in PROVIDERS:
        importlib.import_module(module)


def _defaults(cls) -> dict[str, Any]:
    if not dataclasses.is_dataclass(cls):
        return {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _require(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ValueError(f"technique {name!r}: {what}")


# The modules whose import registers techniques, one technique each: levels 1-4 change the
# architecture (attnlab/models/techniques), levels 1, 3 and 5 act at sampling time (attnlab/control).
PROVIDERS: list[str] = [
    *(
        f"attnlab.models.techniques.{m}"
        for m in (
            "abs_pos",
            "in_context",
            "mask_cond",
            "rope",
            "tome",
            "attn_placement",
            "channel_attention",
            "cross_attention",
            "linear_attention",
            "window_attention",
            "time_embedding",
            "time_gated_attention",
            "attention_gate",
            "cross_scale_attention",
            "long_skips",
        )
    ),
    *(f"attnlab.control.{m}" for m in ("tgate", "cache", "pag", "sag", "excite", "heatmaps", "p2p")),
]
