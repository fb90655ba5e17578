"""T-GATE: cross-attention frozen after a gate step, self-attention cached on a schedule, CFG dropped.

Zhang et al., "Cross-Attention Makes Inference Cumbersome in Text-to-Image Diffusion Models"
(2024, arXiv:2404.02747) and its v2 "Faster Diffusion via Temporal Attention Decomposition":
cross-attention converges in the first steps (semantics planning), so the later steps (fidelity
improving) reuse its last output and need no classifier-free guidance; self-attention is cached
every few steps in both phases. The schedule is the reference code's (`tgate_scheduler` in
HaozheLiu-ST/T-GATE `tgate/tgate_utils.py`, its defaults `gate_step=10, sp_interval=5,
fi_interval=1, warm_up=2` of 25 steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from attnlab.attention import AttnCall, Control, select_layers
from attnlab.control.common import as_patterns, check_positive, is_main_pass, require_layers
from attnlab.errors import ConfigError
from attnlab.techniques import register

Action = Literal["compute", "store", "reuse"]
MEAN = None  # key of the averaged entry in a layer's cache (rows shared by every chunk)


@register(
    "tgate",
    level=3,
    paper="T-GATE (Zhang et al., 2024, arXiv:2404.02747)",
    training_free=True,
    provides=("controls", "cfg_schedule"),
    pipelines=("sd", "sdxl", "pixart"),
    pipelines_note="joint attention (SD3, Flux) puts image and text in one softmax: no cross-attention output to freeze",
    summary="as the T-GATE code: cross-attention frozen after a gate step, self-attention cached every "
    "few steps, CFG dropped after the gate (drop_cfg=False keeps it, a variant): faster late steps",
    modalities=(1, 2, "tokens", "points"),
)
@dataclass(eq=False)
class TGate(Control):
    """T-GATE on the selected layers; the defaults are the reference code's (10 of 25 steps gated).

    Per step i, with gate step g = ceil(gate * steps), as `tgate_scheduler` does:
    - i < g - 1 (semantics planning): cross-attention computed; self-attention computed for the
      first `warm_up` steps, then stored at step `warm_up` and every step that is a multiple of
      `sp_interval`, reused at the others;
    - i == g - 1 (the gate): both computed and stored, as the mean of the uncond and cond outputs;
    - i >= g (fidelity improving): cross-attention reused; self-attention stored at multiples of
      `fi_interval`, reused at the others; without classifier-free guidance when `drop_cfg`.
    Only the sampling loop's own passes are gated or cached: a guidance's extra pass (PAG, SAG,
    Attend-and-Excite) computes every layer.

    Args:
        gate: fraction of the run after which cross-attention is no longer computed (1.0 = never);
            the reference's gate_step / steps.
        layers: layer name patterns (their cross- and self-attention layers are gated and cached).
        average: at the gate, keep the mean of the uncond and cond outputs for every chunk, as
            T-GATE does; False keeps each chunk's own output (with drop_cfg=False, guidance stays
            alive after the gate).
        sp_interval: self-attention refresh interval in steps before the gate (1 = always computed).
        fi_interval: the same after the gate.
        warm_up: number of steps at the start where self-attention is always computed (steps, as
            the reference counts them, not a fraction).
        drop_cfg: after the gate, run one chunk with no guidance formula, as the reference does;
            False ("CFG kept", a variant) keeps both chunks and the guidance. Read by the sampling
            loop through `guidance_schedule`; the attention part ignores it. The chunk is the cond
            rows, where the reference passes the negative prompt: the same when text enters only
            through the frozen cross-attention (SD); attnlab's models also add a pooled text vector.
            On a diffusers pipeline the host runs the negative prompt's rows, as the T-GATE
            pipelines do (SDXL's U-Net also reads the pooled text and size conditions).
    Joint attention (SD3, Flux) is refused: it has no cross-attention output of its own to freeze.
    """

    gate: float = 0.4
    layers: str | tuple[str, ...] = "**"
    average: bool = True
    sp_interval: int = 5
    fi_interval: int = 1
    warm_up: int = 2
    drop_cfg: bool = True

    def __post_init__(self):
        if not 0.0 <= self.gate <= 1.0:
            raise ConfigError(f"tgate: gate must be a fraction of the run in [0, 1], got {self.gate}")
        check_positive("tgate", "sp_interval", self.sp_interval)
        check_positive("tgate", "fi_interval", self.fi_interval)
        check_positive("tgate", "warm_up", self.warm_up, allow_zero=True)
        self.layers = as_patterns(self.layers)
        self.kind = None
        self.cache: dict[str, dict[str | None, Tensor]] = {}  # layer -> role (or MEAN) -> output rows
        self.skipped = {"cross": 0, "self": 0}

    # The schedule

    def gate_step(self, num_steps: int) -> int:
        """First gated step index for a run of `num_steps` (== num_steps when never gated)."""
        return min(num_steps, math.ceil(self.gate * num_steps))

    def gated(self, step: int | None, num_steps: int | None) -> bool:
        return step is not None and step >= self.gate_step(num_steps)

    def action(self, kind: str, step: int, num_steps: int) -> Action:
        """What a `kind` ("cross" or "self") layer does at `step`: compute, store (compute and keep
        for later steps) or reuse the kept output."""
        g = self.gate_step(num_steps)
        if step == g - 1:
            return "store"  # the gate forces a refresh of both
        if step >= g:
            if kind == "cross":
                return "reuse"
            return "store" if step % self.fi_interval == 0 else "reuse"
        if kind == "cross":
            return "compute"
        if step < self.warm_up:
            return "compute"
        return "store" if step == self.warm_up or step % self.sp_interval == 0 else "reuse"

    def guidance_scale(self, scale: float, step: int, num_steps: int) -> float:
        """The CFG scale the loop should use at `step`: 1.0 (no uncond pass) after the gate if drop_cfg."""
        return 1.0 if self.drop_cfg and self.gated(step, num_steps) else scale

    def guidance_schedule(self, scale: float) -> float | Callable[[int, int], float]:
        """`sample(guidance=...)` argument: `scale`, or a schedule that is 1 after the gate when drop_cfg is set."""
        if not self.drop_cfg:
            return scale
        return lambda i, steps: self.guidance_scale(scale, i, steps)

    # Control hooks

    def caches_self(self) -> bool:
        return self.sp_interval > 1 or self.fi_interval > 1

    def select(self, model: nn.Module):
        kinds = ("cross", "self") if self.caches_self() else ("cross",)
        selected = select_layers(model, self.layers)
        joint = [m.name for m in selected if m.kind == "joint"]
        if joint:
            raise ConfigError(
                f"tgate cannot gate joint attention ({joint[0]}, ...): image and text tokens share one "
                "softmax there (SD3, Flux), so there is no cross-attention output to freeze apart from "
                "self-attention, and the text stream's own update depends on the image; T-GATE is "
                "defined for models with separate cross-attention (SD 1.x/2.x, SDXL, PixArt)"
            )
        found = [m for m in selected if m.kind in kinds]
        require_layers("tgate", model, found, self.layers, "cross")
        return found

    def active(self, call: AttnCall) -> bool:
        return call.step is not None and is_main_pass(call)

    def replace(self, call: AttnCall, x: Tensor) -> Tensor | None:
        act = self.action(call.kind, call.step, call.num_steps)
        out = self._reused(call, x) if act == "reuse" else None
        if out is not None:
            self.skipped[call.kind] += 1
        elif act == "store":
            call.scratch[id(self)] = call.step == self.gate_step(call.num_steps) - 1 and self.average
        return out

    def after(self, call: AttnCall, out: Tensor) -> Tensor:
        average = call.scratch.get(id(self))
        if average is not None:
            n = out.shape[0] // len(call.roles)
            own = {r: out[i * n : (i + 1) * n].detach() for i, r in enumerate(call.roles)}
            # T-GATE at the gate: cache = (hidden_uncond + hidden_pred_text) / 2
            self.cache[call.name] = {MEAN: torch.stack(list(own.values())).mean(0)} if average else own
        return out

    def _reused(self, call: AttnCall, x: Tensor) -> Tensor | None:
        kept = self.cache.get(call.name)
        if not kept:
            return None  # nothing stored yet (gate = 0): compute
        parts = [kept.get(r, kept.get(MEAN)) for r in call.roles]
        if any(p is None for p in parts):
            return None
        out = torch.cat(parts)
        return out if out.shape[:2] == x.shape[:2] else None

    def on_install(self, model, layers):
        self.cache.clear()
        self.skipped = {"cross": 0, "self": 0}

    def on_remove(self, model):
        self.cache.clear()
