"""Attention-output caching across sampling steps: recompute every k-th step, reuse in between.

The attention-level form of DeepCache (Ma et al., 2024, arXiv:2312.00858) and Pyramid Attention
Broadcast (Zhao et al., 2024, arXiv:2408.12588): neighbouring steps produce nearly the same
attention outputs, so a layer can hand back the output it computed a few steps earlier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor, nn

from attnlab.attention import AttnCall, Control
from attnlab.control.common import (
    as_patterns,
    check_choice,
    check_positive,
    is_main_pass,
    require_layers,
    window,
)
from attnlab.techniques import register


@dataclass(eq=False)
class StepCache:
    """Per-layer outputs kept from the last refresh step, keyed by (layer, roles, input shape).

    Refresh steps are the steps of the window counted from its first step: first, first+every, ...
    Steps before the window always compute; steps after it too.
    """

    every: int
    start: float = 0.0
    end: float = 1.0
    store: dict = field(default_factory=dict)

    def refresh(self, step: int, num_steps: int) -> bool:
        first = math.ceil(self.start * num_steps)
        if step < first or step / num_steps >= self.end:
            return True
        return (step - first) % self.every == 0

    def key(self, call: AttnCall, x: Tensor):
        return (call.name, call.roles, tuple(x.shape))

    def get(self, call: AttnCall, x: Tensor) -> Tensor | None:
        if call.step is None or self.refresh(call.step, call.num_steps):
            return None
        return self.store.get(self.key(call, x))

    def put(self, key, out: Tensor) -> None:
        self.store[key] = out.detach()


@register(
    "attn_cache",
    level=3,
    paper="DeepCache (Ma et al., 2024, arXiv:2312.00858); PAB (Zhao et al., 2024, arXiv:2408.12588)",
    training_free=True,
    provides=("controls",),
    summary="reuse each selected attention output for k-1 steps: fewer attention calls, small drift",
    modalities=(1, 2, "tokens", "points"),
)
@dataclass(eq=False)
class AttnCache(Control):
    """Recompute the selected attention layers every `every` steps inside [start, end); reuse otherwise.

    Args:
        every: refresh interval in steps (1 = no caching).
        layers: layer name patterns (see `attnlab.attention.match_layer`).
        kind: "self", "cross" or "both".
        start, end: the step window, as fractions of the run, where outputs are reused.
    Only the sampling loop's own passes are cached: a guidance's extra pass (PAG's perturbed pass,
    SAG's degraded pass, Attend-and-Excite's excite pass) computes every layer at every step.

    With start=0 this is diffusers' pyramid attention broadcast with `*_block_skip_range=every` and
    timestep ranges that hold every step: PAB refreshes at its iterations 0, every, 2 * every, ...
    Its iterations count the module's calls, not steps, and restart only where the pipeline resets
    its stateful hooks (CacheMixin models such as Flux, not the U-Nets, PixArt or SD3); here the
    steps are the pipeline's own, from 0 in every run.
    """

    every: int = 2
    layers: str | tuple[str, ...] = "**"
    kind: str | None = "both"
    start: float = 0.1
    end: float = 1.0

    def __post_init__(self):
        check_positive("attn_cache", "every", self.every)
        check_choice("attn_cache", "kind", self.kind, ["self", "cross", "both", None])
        self.window = window(self.start, self.end, "attn_cache")
        self.layers = as_patterns(self.layers)
        self.cache = StepCache(self.every, self.start, self.end)
        self.hits = 0

    def select(self, model: nn.Module):
        from attnlab.attention import select_layers

        kind = None if self.kind in (None, "both") else self.kind
        found = select_layers(model, self.layers, kind)
        require_layers("attn_cache", model, found, self.layers, kind)
        return found

    def active(self, call: AttnCall) -> bool:
        # the window decides reuse, not whether to record; extra passes are never cached
        return call.step is not None and is_main_pass(call)

    def replace(self, call: AttnCall, x: Tensor) -> Tensor | None:
        out = self.cache.get(call, x)
        if out is None:
            call.scratch[id(self)] = self.cache.key(call, x)  # computed now: store it in `after`
        else:
            self.hits += 1
        return out

    def after(self, call: AttnCall, out: Tensor) -> Tensor:
        key = call.scratch.get(id(self))
        if key is not None:
            self.cache.put(key, out)
        return out

    def on_install(self, model, layers):
        self.cache.store.clear()
        self.hits = 0

    def on_remove(self, model):
        self.cache.store.clear()
