"""Perturbed-Attention Guidance: guide away from a pass whose self-attention maps are the identity.

Ahn et al., "Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance" (2024,
arXiv:2403.17377). The perturbed pass replaces chosen self-attention maps with the identity, so
each token keeps only its own value (output = to_out(V)). The defaults are those of diffusers' PAG
pipelines (`pipelines/pag/pag_utils.py`, `pipeline_pag_sd.py`): the mid block's self-attention on a
U-Net (`pag_applied_layers="mid"`), the second transformer block on a DiT ("blocks.1", as for
PixArt-Sigma, SD3 and HunyuanDiT), scale 3.0, and the guidance

    with CFG:    eps = eps_u + w (eps_c - eps_u) + s (eps_c - eps_ptb)
    without CFG: eps = eps_c + s (eps_c - eps_ptb)

with the adaptive scale s(t) = max(0, scale - adaptive_scale * (1000 - t)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.attention import AttnCall, Control, attention_layers, select_layers
from attnlab.control.common import as_patterns, check_positive, extra_pass, require_layers, window
from attnlab.techniques import register

PAG_ROLE = "pag"
UNET_LAYERS = "mid"  # diffusers' default for SD and SDXL: every self-attention of the mid block
DIT_LAYERS = "blocks.1"  # diffusers' default for transformers; attnlab's DiT names it "blocks.1.self"


def transformer_blocks(model: nn.Module) -> list[str]:
    """The transformer blocks holding a transformer's self-attention layers, in order ("blocks.{i}"
    on attnlab's DiT, "transformer_blocks.{i}" on a diffusers transformer); [] for any other model.

    attnlab names layers by module path, so the names tell a DiT (every self-attention under
    `blocks`) from a U-Net (down/mid/up).
    """
    names = [n for n, m in attention_layers(model).items() if m.kind in ("self", "joint")]
    for top in ("blocks", "transformer_blocks"):
        if names and all(n.split(".")[0] == top for n in names):
            return list(dict.fromkeys(".".join(n.split(".")[:2]) for n in names))
    if names and any(n.startswith("transformer_blocks.") for n in names):  # Flux: + single blocks
        return list(
            dict.fromkeys(".".join(n.split(".")[:2]) for n in names if n.startswith("transformer_blocks."))
        )
    return []


def reference_layers(model: nn.Module) -> str:
    """PAG's default layer pattern for `model`: the second transformer block on a transformer
    ("blocks.1", diffusers' "transformer_blocks.1"), the mid block on a U-Net ("mid", diffusers'
    "mid_block")."""
    blocks = transformer_blocks(model)
    if blocks:
        return blocks[0].split(".")[0] + ".1"
    names = attention_layers(model)
    return "mid_block" if any(n.startswith("mid_block.") for n in names) else UNET_LAYERS


def identity_attention(layer, x: Tensor, call: AttnCall | None = None) -> Tensor:
    """Self-attention with the identity map, A = I, without forming A: to_out(V). (B, N, dim).

    A hosted diffusers layer computes its own (`perturbed`: joint layers keep their text)."""
    if hasattr(layer, "perturbed"):
        return layer.perturbed(call, x)
    c = layer.dim
    w = layer.to_qkv.weight[2 * c :]  # the V rows of the fused q/k/v projection
    b = None if layer.to_qkv.bias is None else layer.to_qkv.bias[2 * c :]
    return layer.to_out(F.linear(x, w, b))


@dataclass(eq=False)
class IdentitySelfAttention(Control):
    """On passes that carry `role`, the selected self-attention layers output to_out(V).

    `layers=None` selects the reference's layers for the model's backbone (`reference_layers`).
    """

    layers: tuple[str, ...] | None = None
    role: str = PAG_ROLE

    def __post_init__(self):
        self.kind = "self"

    def select(self, model: nn.Module):
        patterns = self.layers or (reference_layers(model),)
        found = select_layers(model, patterns, ("self", "joint"))
        require_layers("pag", model, found, patterns, "self")
        return found

    def active(self, call: AttnCall) -> bool:
        return self.role in call.roles

    def replace(self, call: AttnCall, x: Tensor) -> Tensor | None:
        if call.roles == (self.role,):
            return identity_attention(call.layer, x, call)
        return None


@register(
    "pag",
    level=5,
    paper="PAG (Ahn et al., 2024, arXiv:2403.17377)",
    training_free=True,
    provides=("guidance",),
    summary="guide away from a pass with identity self-attention (U-Net mid block, DiT blocks.1, as "
    "diffusers): sharper structure, one extra forward per step",
    modalities=(1, 2, "tokens", "points"),
)
@dataclass(eq=False)
class PAG:
    """Perturbed-attention guidance term, a plug-in for `attnlab.diffusion.sample(guidances=...)`.

    Args:
        scale: guidance strength s in out + s * (out_cond - out_perturbed); 0 turns it off.
        layers: self-attention layer patterns whose map becomes the identity in the perturbed pass;
            None (the default) is the reference's: "mid" on a U-Net, "blocks.1" (the second
            transformer block) on a DiT. Patterns match whole name parts, so "blocks.1" never
            selects "blocks.10" (diffusers' `re.search` does). "**" perturbs every self-attention
            (attnlab's former default).
        adaptive_scale: s(t) = max(0, scale - adaptive_scale * (1000 - t)) at timestep t (t on the
            0..1000 training scale, as the reference); 0 keeps s constant. A step where s(t) is 0
            skips the perturbed pass.
        start, end: the step window, as fractions of the run.
    """

    scale: float = 3.0
    layers: str | tuple[str, ...] | None = None
    adaptive_scale: float = 0.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        check_positive("pag", "scale", self.scale, allow_zero=True)
        check_positive("pag", "adaptive_scale", self.adaptive_scale, allow_zero=True)
        self.window = window(self.start, self.end, "pag")
        self.layers = None if self.layers is None else as_patterns(self.layers)
        self._control = IdentitySelfAttention(self.layers)

    def controls(self) -> list[Control]:
        return [self._control]

    def active(self, i: int, steps: int) -> bool:
        return self.scale != 0 and self.window.contains(i, steps)

    def scale_at(self, t: Tensor) -> Tensor:
        """(B,) the guidance scale at timesteps t: max(0, scale - adaptive_scale * (1000 - t))."""
        return (self.scale - self.adaptive_scale * (1000 - t.double())).clamp(min=0)

    pass_role = PAG_ROLE  # the batch role of the perturbed pass

    def needs_pass(self, t: Tensor) -> bool:
        """Whether the perturbed pass runs at timesteps t (not where the adaptive scale reached 0)."""
        return bool((self.scale_at(t) > 0).any())

    def combine(self, cond_out: Tensor, perturbed: Tensor, t: Tensor) -> Tensor:
        """The guidance term s(t) * (out_cond - out_perturbed) from the two passes' outputs."""
        s = self.scale_at(t).to(cond_out.dtype).view(-1, *[1] * (cond_out.dim() - 1))  # (B, 1, ..., 1)
        return s * (cond_out - perturbed)

    def correction(self, model, x_in: Tensor, t: Tensor, cond, out: dict, ctx: dict) -> Tensor:
        if not self.needs_pass(t):
            return torch.zeros_like(out["cond"])  # the adaptive scale reached 0: no pass needed
        with extra_pass(model, (PAG_ROLE,), ctx, t):
            perturbed = model(x_in, t, cond)
        return self.combine(out["cond"], perturbed, t)
