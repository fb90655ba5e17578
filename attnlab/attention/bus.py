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

from torch import Tensor, nn

from attnlab.attention.core import Attention, AttnCall
from attnlab.errors import ConfigError


@dataclass
class BusState:
    """Shared by every Attention of one model; the sampling loop writes it, controls read it."""

    step: int | None = None
    num_steps: int | None = None
    timestep: Tensor | None = None
    roles: tuple[str, ...] = ("cond",)


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


def select_layers(model: nn.Module, layers: str | Sequence[str] = "**", kind: str | None = None):
    """The Attention layers whose name matches any pattern (and of `kind`, if given)."""
    patterns = [layers] if isinstance(layers, str) else list(layers)
    found = [
        m
        for name, m in attention_layers(model).items()
        if any(match_layer(p, name) for p in patterns) and (kind is None or m.kind == kind)
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
    """

    layers: str | Sequence[str] = "**"
    kind: str | None = None
    window: StepWindow = StepWindow()

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


@contextmanager
def control(model: nn.Module, controls: Control | Iterable[Control]) -> Iterator[list[Control]]:
    """Install controls on the layers they select for the duration of the block.

    Example:
        with control(model, [HeatMaps(), PAG(scale=3.0, layers="mid")]):
            x = sample(model, ...)
    """
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
