"""Perturbed-Attention Guidance: guide away from a pass whose self-attention maps are the identity.

Ahn et al., "Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance" (2024,
arXiv:2403.17377): the perturbed pass replaces chosen self-attention maps with the identity, so
each token keeps only its own value (output = to_out(V)); the guidance term is
scale * (out_cond - out_perturbed), added on top of classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.attention import AttnCall, Control, select_layers
from attnlab.control.common import as_patterns, check_positive, extra_pass, require_layers, window
from attnlab.techniques import register

PAG_ROLE = "pag"


def identity_attention(layer, x: Tensor) -> Tensor:
    """Self-attention with the identity map, A = I, without forming A: to_out(V). (B, N, dim)."""
    c = layer.dim
    w = layer.to_qkv.weight[2 * c :]  # the V rows of the fused q/k/v projection
    b = None if layer.to_qkv.bias is None else layer.to_qkv.bias[2 * c :]
    return layer.to_out(F.linear(x, w, b))


@dataclass(eq=False)
class IdentitySelfAttention(Control):
    """On passes that carry `role`, the selected self-attention layers output to_out(V)."""

    layers: tuple[str, ...] = ("**",)
    role: str = PAG_ROLE

    def __post_init__(self):
        self.kind = "self"

    def select(self, model: nn.Module):
        found = select_layers(model, self.layers, "self")
        require_layers("pag", model, found, self.layers, "self")
        return found

    def active(self, call: AttnCall) -> bool:
        return self.role in call.roles

    def replace(self, call: AttnCall, x: Tensor) -> Tensor | None:
        if call.roles == (self.role,):
            return identity_attention(call.layer, x)
        return None


@register(
    "pag",
    level=5,
    paper="PAG (Ahn et al., 2024, arXiv:2403.17377)",
    training_free=True,
    provides=("guidance",),
    summary="guide away from an identity-self-attention pass: sharper structure, one extra forward per step",
)
@dataclass(eq=False)
class PAG:
    """Perturbed-attention guidance term, a plug-in for `attnlab.diffusion.sample(guidances=...)`.

    Args:
        scale: guidance strength s in out + s * (out_cond - out_perturbed); 0 turns it off.
        layers: self-attention layer patterns whose map becomes the identity in the perturbed pass.
        start, end: the step window, as fractions of the run.
    """

    scale: float = 3.0
    layers: str | tuple[str, ...] = "**"
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        check_positive("pag", "scale", self.scale, allow_zero=True)
        self.window = window(self.start, self.end, "pag")
        self.layers = as_patterns(self.layers)
        self._control = IdentitySelfAttention(self.layers)

    def controls(self) -> list[Control]:
        return [self._control]

    def active(self, i: int, steps: int) -> bool:
        return self.scale != 0 and self.window.contains(i, steps)

    def correction(self, model, x_in: Tensor, t: Tensor, cond, out: dict, ctx: dict) -> Tensor:
        with extra_pass(model, (PAG_ROLE,), ctx, t):
            perturbed = model(x_in, t, cond)
        return self.scale * (out["cond"] - perturbed)
