"""The attention bus: stable layer names, the sampling-step state, and scoped installation of controls.

A control is installed on the layers it selects for the length of a `with control(model, [...])`
block. Several controls on one layer run in installation order (`before`, `replace`, `probs`), and
`after` hooks run in reverse so the first control wraps the others, like nested context managers.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.attention.core import Attention, AttnCall
from attnlab.errors import ConfigError


@dataclass
class BusState:
    """Shared by every Attention of one model; the sampling loop writes it, controls read it.

    Attributes:
        step, num_steps, timestep: the sampling step of the current model call (`sampling_step`).
        roles: names of the equal chunks the current batch is made of (e.g. ("uncond", "cond")).
        seeds: one seed per sample of the current sampling run (`sample_seeds`), None when the run
            has none; controls read them per batch row as `AttnCall.seeds`.
        rows: which of the run's samples the rows of each chunk are, when a model call covers only
            some of them (`sample_rows`); None: all, in order.
        grids: every layer's query grid by name, found once (`attention_grids`).
        point_weights: during a points backbone's forward, how each input point reads its group
            tokens (`reading_points`); None otherwise.
    """

    step: int | None = None
    num_steps: int | None = None
    timestep: Tensor | None = None
    roles: tuple[str, ...] = ("cond",)
    seeds: tuple[int, ...] | None = None
    rows: tuple[int, ...] | None = None
    grids: dict[str, tuple[int, ...]] | None = None
    point_weights: tuple[Tensor, Tensor] | None = None

    def chunk_seeds(self) -> tuple[int, ...] | None:
        """The seeds of the samples one chunk's rows belong to, in row order (None without seeds)."""
        if self.seeds is None:
            return None
        return self.seeds if self.rows is None else tuple(self.seeds[i] for i in self.rows)


def name_layers(model: nn.Module) -> BusState:
    """Give every Attention in `model` its dotted path as stable name and one shared BusState."""
    state = BusState()
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            module.name = name
            module.state = state
    model.bus_state = state
    return state


def attention_layers(model: nn.Module) -> dict[str, Attention]:
    """Every attention layer of `model` by name: attnlab's Attention modules, or on a diffusers
    denoiser inside a control scope, its attention modules as the host adapted them."""
    hosted = getattr(model, "attnlab_layers", None)
    if hosted is not None:
        return dict(hosted)
    return {m.name: m for m in model.modules() if isinstance(m, Attention)}


def bus_state(model: nn.Module) -> BusState:
    state = getattr(model, "bus_state", None)
    return state if state is not None else name_layers(model)


def match_layer(pattern: str, name: str) -> bool:
    """Whether `pattern` selects layer `name`, matching whole dot-separated parts.

    Each pattern part is an fnmatch pattern for one name part; `**` spans any number of parts; a
    pattern that matches a prefix of the name selects everything under it. So `blocks.1` selects
    `blocks.1.attn1` but never `blocks.10.attn1`, and `**.attn2` selects every cross-attention.
    """
    return _match_parts(pattern.split("."), name.split("."))


def _match_parts(pat: list[str], parts: list[str]) -> bool:
    if not pat:
        return True  # the pattern is a whole-part prefix of the name
    if pat[0] == "**":
        return any(_match_parts(pat[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pat[0]) and _match_parts(pat[1:], parts[1:])


def select_layers(
    model: nn.Module, layers: str | Sequence[str] = "**", kind: str | Sequence[str] | None = None
):
    """The Attention layers whose name matches any pattern (and of `kind`, or one of those kinds)."""
    patterns = [layers] if isinstance(layers, str) else list(layers)
    kinds = None if kind is None else ({kind} if isinstance(kind, str) else set(kind))
    found = [
        m
        for name, m in attention_layers(model).items()
        if any(match_layer(p, name) for p in patterns) and (kinds is None or m.kind in kinds)
    ]
    return found


@dataclass
class StepWindow:
    """Sampling steps where a control acts, as fractions of the run: [start, end).

    Raises:
        ConfigError: unless 0 <= start <= end <= 1 (prefixed with `owner`, the technique, if given).
    """

    start: float = 0.0
    end: float = 1.0
    owner: str = "step window"

    def __post_init__(self):
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ConfigError(
                f"{self.owner}: step window needs 0 <= start <= end <= 1, got start={self.start}, end={self.end}"
            )

    def contains(self, step: int | None, num_steps: int | None) -> bool:
        if step is None or num_steps is None:
            return True  # outside a sampling loop a control is always on
        frac = step / num_steps
        return self.start <= frac < self.end


class Control:
    """Base class of everything installed on attention layers. Override only the hooks you need.

    Attributes:
        layers: name patterns of the layers to act on (see `match_layer`).
        kind: "self", "cross" or None for both.
        window: the sampling steps where the control acts.
        changes_tokens: whether it changes the layer's query tokens (token merging), so that a
            control reading the layer's full map cannot share the layer with it.
    """

    layers: str | Sequence[str] = "**"
    kind: str | None = None
    window: StepWindow = StepWindow()
    changes_tokens: bool = False

    def select(self, model: nn.Module) -> list[Attention]:
        return select_layers(model, self.layers, self.kind)

    def active(self, call: AttnCall) -> bool:
        return self.window.contains(call.step, call.num_steps)

    def needs_probs(self, call: AttnCall) -> bool:
        return False

    def before(self, call: AttnCall, x: Tensor) -> Tensor:
        return x

    def replace(self, call: AttnCall, x: Tensor) -> Tensor | None:
        return None

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        return p

    def after(self, call: AttnCall, out: Tensor) -> Tensor:
        return out

    def on_install(self, model: nn.Module, layers: list[Attention]) -> None:
        """Called once when installed, before any call."""

    def on_remove(self, model: nn.Module) -> None:
        """Called once when the scope ends."""


def attention_grids(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every Attention layer's query grid, by name, at the sample size of `model.config`.

    Found once per model, by one batch-1 forward of zeros (null condition, no gradient) with every
    installed control set aside, and kept on the bus state. A model without a config that has
    `sample_shape` (a bare Attention, a hand-built toy) gives {}.
    """
    st = bus_state(model)
    if st.grids is None:
        st.grids = _probe_grids(model)
    return st.grids


class _GridRecorder(Control):
    """Stands in for a layer's controls during `attention_grids`' forward: notes the grid, then
    steps aside so the layer runs its plain path."""

    def __init__(self):
        self.seen: dict[str, tuple[int, ...]] = {}

    def active(self, call: AttnCall) -> bool:
        self.seen[call.name] = call.grid
        return False


def _probe_grids(model: nn.Module) -> dict[str, tuple[int, ...]]:
    shape = getattr(getattr(model, "config", None), "sample_shape", None)
    if shape is None:
        return {}
    rec, layers = _GridRecorder(), list(attention_layers(model).values())
    saved = [layer.controls for layer in layers]
    p = next(model.parameters())
    try:
        for layer in layers:
            layer.controls = [rec]
        with torch.no_grad():
            model(torch.zeros(shape(1), device=p.device, dtype=p.dtype), torch.zeros(1, device=p.device))
    finally:
        for layer, controls in zip(layers, saved):
            layer.controls = controls
    return rec.seen


def control(model, controls, **options):
    """Install controls on the layers they select for the duration of the block.

    `model` is an attnlab model, or a diffusers pipeline or denoiser (U-Net or transformer): there
    the stock pipeline runs the controls, and guidance terms (PAG, SAG, Attend-and-Excite) too,
    through its own `__call__` (`attnlab.integrations.diffusers.control`, which takes `options`).

    Example:
        with control(model, [HeatMaps(), AttnCache(every=2)]):
            x = sample(model, ..., guidances=[PAG(scale=3.0)])
        with control(pipe, [PAG(scale=3.0, layers="mid_block"), maps]):
            image = pipe("a red car", num_inference_steps=25).images[0]
    """
    from attnlab.integrations.diffusers.host import backbone_of, control_backbone, hosts

    if backbone_of(model) is not None and not options:  # an attnlab model over a diffusers denoiser
        return control_backbone(model, controls)
    if hosts(model):
        from attnlab.integrations.diffusers.host import control as host_control

        return host_control(model, controls, **options)
    if options:
        raise TypeError(f"control() on an attnlab model takes no options, got {sorted(options)}")
    return _control(model, controls)


@contextmanager
def _control(model: nn.Module, controls: Control | Iterable[Control]) -> Iterator[list[Control]]:
    ctrls = [controls] if isinstance(controls, Control) else list(controls)
    bus_state(model)
    installed: list[tuple[Attention, Control]] = []
    try:
        for c in ctrls:
            layers = c.select(model)
            c.on_install(model, layers)
            for layer in layers:
                layer.controls.append(c)
                installed.append((layer, c))
        yield ctrls
    finally:
        for layer, c in installed:
            layer.controls.remove(c)
        for c in ctrls:
            c.on_remove(model)


@contextmanager
def sampling_step(model: nn.Module, step: int, num_steps: int, timestep: Tensor, roles=("cond",)):
    """Tell the bus which sampling step the next model calls belong to."""
    st = bus_state(model)
    st.step, st.num_steps, st.timestep, st.roles = step, num_steps, timestep, tuple(roles)
    try:
        yield st
    finally:
        st.step = st.num_steps = st.timestep = None
        st.roles = ("cond",)


@contextmanager
def reading_points(model: nn.Module, near: Tensor, weights: Tensor):
    """Tell the bus, for the model calls inside, how each point of the input reads the query tokens:
    a per-token value m (B, G) is (m[near] * weights).sum(-1) at the points (`AttnCall.point_weights`).

    The points backbone regroups its tokens at every call, so a control that maps token attention
    back onto the points (heat maps) needs the weights of that very call.
    """
    st = bus_state(model)
    saved = st.point_weights
    st.point_weights = (near, weights)
    try:
        yield st
    finally:
        st.point_weights = saved


@contextmanager
def sample_seeds(model: nn.Module, seeds: Sequence[int] | None):
    """Tell the bus the per-sample seeds of a sampling run (`attnlab.diffusion.sample` does).

    Row i of every chunk of a model call is sample i (see `sample_rows` for calls over fewer), so
    each control that draws random numbers can draw a row's from its own sample's seed, and a
    sample never depends on the batch around it. None: the run has no per-sample seeds.
    """
    st = bus_state(model)
    saved = st.seeds, st.rows
    st.seeds, st.rows = (None if seeds is None else tuple(int(s) for s in seeds)), None
    try:
        yield st
    finally:
        st.seeds, st.rows = saved


@contextmanager
def sample_rows(model: nn.Module, rows: Sequence[int] | Tensor):
    """Model calls inside cover only some samples, one row each per chunk, in this order: `rows`
    indexes the samples the enclosing calls cover (at the top of a run: its samples, so a batch
    row index), e.g. a refinement pass over the latents not yet converged. Nested scopes compose."""
    st = bus_state(model)
    saved = st.rows
    picked = [int(r) for r in (rows.tolist() if isinstance(rows, Tensor) else rows)]
    st.rows = tuple(picked if saved is None else (saved[r] for r in picked))
    try:
        yield st
    finally:
        st.rows = saved
