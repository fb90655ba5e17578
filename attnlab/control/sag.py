"""Self-Attention Guidance: blur what self-attention attends to, and guide away from the blurred pass.

Hong et al., "Improving Sample Quality of Diffusion Models Using Self-Attention Guidance" (ICCV
2023, arXiv:2210.00939): on the conditional pass, the self-attention map of chosen layers marks
the tokens that receive more than average attention; x0_hat is Gaussian-blurred inside that mask,
re-noised to t with the predicted noise, and denoised again; the guidance term is
scale * (out_cond - out_degraded).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from attnlab.attention import AttnCall, Control, StepWindow, select_layers
from attnlab.control.common import (
    as_patterns,
    check_positive,
    extra_pass,
    gaussian_blur,
    grid_tokens,
    require_layers,
    resize,
    rows,
    window,
)
from attnlab.diffusion import add_noise, predict_eps, predict_x0
from attnlab.techniques import register

SAG_ROLE = "sag"


@dataclass(eq=False)
class AttentionMassRecorder(Control):
    """On the loop's conditional rows, keeps the attention each key token receives: (B, *grid).

    The mass of key j is sum_i mean_heads(A)[i, j]; SAG's mask is mass > 1 (above the average).
    """

    layers: tuple[str, ...] = ("**",)
    window: StepWindow = field(default_factory=StepWindow)
    enabled: bool = True

    def __post_init__(self):
        self.kind = "self"
        self.mass: dict[str, Tensor] = {}

    def select(self, model: nn.Module):
        found = select_layers(model, self.layers, "self")
        require_layers("sag", model, found, self.layers, "self")
        return found

    def active(self, call: AttnCall) -> bool:
        steps_ok = self.window.contains(call.step, call.num_steps)  # maps only on steps that use them
        return self.enabled and steps_ok and "cond" in call.roles and SAG_ROLE not in call.roles

    def needs_probs(self, call: AttnCall) -> bool:
        return True

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        n = p.shape[-1]
        if grid_tokens(call, n) and p.shape[-2] == n:
            mass = rows(call, p, "cond").detach().mean(1).sum(1)  # (B, N): attention each key receives
            self.mass[call.name] = mass.view(mass.shape[0], *call.grid)  # (B, *grid)
        return p


@register(
    "sag",
    level=5,
    paper="SAG (Hong et al., ICCV 2023, arXiv:2210.00939)",
    training_free=True,
    provides=("guidance",),
    summary="guide away from a pass where attended regions are blurred: finer detail, one extra forward per step",
)
@dataclass(eq=False)
class SAG:
    """Self-attention guidance term, a plug-in for `attnlab.diffusion.sample(guidances=...)`.

    Args:
        scale: guidance strength s in out + s * (out_cond - out_degraded); 0 turns it off.
        layers: self-attention layer patterns whose maps build the mask (masks are merged).
        blur_sigma: standard deviation of the Gaussian blur, in samples/pixels.
        threshold: a token is masked when the attention it receives exceeds this (1 = average).
        start, end: the step window, as fractions of the run.
    """

    scale: float = 0.75
    layers: str | tuple[str, ...] = "**"
    blur_sigma: float = 1.0
    threshold: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        check_positive("sag", "scale", self.scale, allow_zero=True)
        check_positive("sag", "blur_sigma", self.blur_sigma)
        self.window = window(self.start, self.end, "sag")
        self.layers = as_patterns(self.layers)
        self._recorder = AttentionMassRecorder(self.layers, self.window, self.scale != 0)
        self.skipped = 0  # active steps without a map (cached or token-merged layers): no term added

    def controls(self) -> list[Control]:
        return [self._recorder]

    def active(self, i: int, steps: int) -> bool:
        return self.scale != 0 and self.window.contains(i, steps)

    def mask(self, size: tuple[int, ...]) -> Tensor | None:
        """(B, 1, *size) float mask of the tokens that receive above-threshold attention, or None."""
        masks = [(m > self.threshold).float().unsqueeze(1) for m in self._recorder.mass.values()]
        if not masks:
            return None
        up = [resize(m, size, mode="nearest") for m in masks]
        return torch.stack(up).amax(0)  # union over the chosen layers

    def correction(self, model, x_in: Tensor, t: Tensor, cond, out: dict, ctx: dict) -> Tensor:
        mask = self.mask(tuple(x_in.shape[2:]))
        self._recorder.mass.clear()
        if mask is None:
            self.skipped += 1
            return torch.zeros_like(out["cond"])  # the map was not computed this step (e.g. cached)
        ab, kind = ctx["alpha_bar_t"], ctx["prediction_type"]
        x0 = predict_x0(kind, x_in, out["cond"], ab)
        eps = predict_eps(kind, x_in, out["cond"], ab)
        x0_deg = torch.lerp(x0, gaussian_blur(x0, self.blur_sigma), mask)  # blur only inside the mask
        with extra_pass(model, (SAG_ROLE,), ctx, t):
            degraded = model(add_noise(x0_deg, eps, ab), t, cond)  # re-noised with the predicted eps
        return self.scale * (out["cond"] - degraded)
