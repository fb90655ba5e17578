"""T-GATE: after a gate step, cross-attention outputs are frozen and reused instead of computed.

Zhang et al., "Cross-Attention Makes Inference Cumbersome in Text-to-Image Diffusion Models"
(2024, arXiv:2404.02747) and its v2 "Faster Diffusion via Temporal Attention Decomposition":
cross-attention converges in the first steps (semantics planning), so the later steps (fidelity
improving) can reuse its last output; self-attention may also be cached every k steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.attention import AttnCall, Control, select_layers
from attnlab.control.cache import StepCache
from attnlab.control.common import as_patterns, check_positive, is_main_pass, require_layers
from attnlab.errors import ConfigError
from attnlab.techniques import register


@register(
    "tgate",
    level=3,
    paper="T-GATE (Zhang et al., 2024, arXiv:2404.02747)",
    training_free=True,
    provides=("controls", "cfg_schedule"),
    summary="freeze cross-attention after a gate step (optionally cache self-attention, drop CFG): faster late steps",
)
@dataclass(eq=False)
class TGate(Control):
    """Freeze the selected cross-attention layers from step `gate * steps` on.

    Args:
        gate: fraction of the run after which cross-attention is no longer computed (1.0 = never).
        layers: layer name patterns (cross-attention layers among them are gated).
        average: reuse the mean of the uncond and cond outputs for every batch chunk, as T-GATE
            does; False reuses each chunk's own output (keeps guidance alive after the gate).
        self_every: also cache self-attention, recomputing it every k steps after `warm_up`
            (T-GATE v2's interval caching); 0 leaves self-attention alone.
        warm_up: fraction of the run at the start where self-attention is always computed.
        drop_cfg: after the gate, sample without the unconditional batch (as the T-GATE code does).
            Read by the sampling loop through `guidance_scale`; the attention part ignores it.
    """

    gate: float = 0.4
    layers: str | tuple[str, ...] = "**"
    average: bool = True
    self_every: int = 0
    warm_up: float = 0.1
    drop_cfg: bool = False

    def __post_init__(self):
        if not 0.0 <= self.gate <= 1.0:
            raise ConfigError(f"tgate: gate must be a fraction of the run in [0, 1], got {self.gate}")
        check_positive("tgate", "self_every", self.self_every, allow_zero=True)
        if not 0.0 <= self.warm_up <= 1.0:
            raise ConfigError(f"tgate: warm_up must be in [0, 1], got {self.warm_up}")
        self.layers = as_patterns(self.layers)
        self.kind = None
        self.frozen: dict[str, dict[str, Tensor]] = {}  # layer -> role -> last cross output
        self.self_cache = StepCache(max(1, self.self_every), self.warm_up, 1.0)
        self.skipped = {"cross": 0, "self": 0}

    # Which steps are gated

    def gate_step(self, num_steps: int) -> int:
        """First gated step index for a run of `num_steps` (== num_steps when never gated)."""
        return min(num_steps, math.ceil(self.gate * num_steps))

    def gated(self, step: int | None, num_steps: int | None) -> bool:
        return step is not None and step >= self.gate_step(num_steps)

    def guidance_scale(self, scale: float, step: int, num_steps: int) -> float:
        """The CFG scale the loop should use at `step`: 1.0 (no uncond pass) after the gate if drop_cfg."""
        return 1.0 if self.drop_cfg and self.gated(step, num_steps) else scale

    def guidance_schedule(self, scale: float) -> float | Callable[[int, int], float]:
        """`sample(guidance=...)` argument: `scale`, or a schedule that is 1 after the gate when drop_cfg is set."""
        if not self.drop_cfg:
            return scale
        return lambda i, steps: self.guidance_scale(scale, i, steps)

    # Control hooks

    def select(self, model: nn.Module):
        kinds = ("cross", "self") if self.self_every else ("cross",)
        found = [m for m in select_layers(model, self.layers) if m.kind in kinds]
        require_layers("tgate", model, found, self.layers, "cross")
        return found

    def active(self, call: AttnCall) -> bool:
        return call.step is not None

    def replace(self, call: AttnCall, x: Tensor) -> Tensor | None:
        if call.kind == "self":
            return self._self_replace(call, x)
        if not self.gated(call.step, call.num_steps):
            call.scratch[id(self)] = is_main_pass(call)  # record this output in `after`
            return None
        out = self._frozen_output(call, x)
        if out is not None:
            self.skipped["cross"] += 1
        return out

    def after(self, call: AttnCall, out: Tensor) -> Tensor:
        note = call.scratch.get(id(self))
        if call.kind == "cross" and note:
            n = out.shape[0] // len(call.roles)
            self.frozen[call.name] = {r: out[i * n : (i + 1) * n].detach() for i, r in enumerate(call.roles)}
        elif call.kind == "self" and note is not None:
            self.self_cache.put(note, out)
        return out

    def _frozen_output(self, call: AttnCall, x: Tensor) -> Tensor | None:
        cache = self.frozen.get(call.name)
        if not cache:
            return None  # gated before anything was recorded (gate = 0): compute
        mean = torch.stack(list(cache.values())).mean(0)  # T-GATE: (uncond + cond) / 2
        parts = [mean if self.average else cache.get(r, mean) for r in call.roles]
        out = torch.cat(parts)
        return out if out.shape[:2] == x.shape[:2] else None

    def _self_replace(self, call: AttnCall, x: Tensor) -> Tensor | None:
        out = self.self_cache.get(call, x)
        if out is None:
            call.scratch[id(self)] = self.self_cache.key(call, x)
        else:
            self.skipped["self"] += 1
        return out

    def on_install(self, model, layers):
        self.frozen.clear()
        self.self_cache.store.clear()
        self.skipped = {"cross": 0, "self": 0}

    def on_remove(self, model):
        self.frozen.clear()
        self.self_cache.store.clear()
