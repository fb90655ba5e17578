"""Self-Attention Guidance: blur what self-attention attends to, and guide away from the blurred pass.

Hong et al., "Improving Sample Quality of Diffusion Models Using Self-Attention Guidance" (ICCV
2023, arXiv:2210.00939). The defaults are those of diffusers' SAG pipeline
(`pipelines/deprecated/stable_diffusion_sag/pipeline_stable_diffusion_sag.py`): one self-attention
map, the U-Net mid block's (on a DiT the middle transformer block's), read on the unconditional rows
under CFG (Eq. 25; the cond rows without CFG) marks the key tokens that receive more than average
attention, mean_heads(A).sum(queries) > 1, upsampled (nearest) to the sample; x0_hat predicted from
that branch is blurred inside the mask (9 taps, sigma 1), re-noised to t with the branch's predicted
noise, and denoised again on the same branch; the guidance term is
scale * (out_uncond - out_degraded), scale 0.75.

On diffusers pipelines (`attnlab.attention.control(pipe, [SAG()])`) the same algorithm runs in the
model's own parametrisation:
- eps / v models (SD, SDXL, PixArt): the DDIM algebra above on the denoiser's input, which is
  sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps for DDIM and for Euler's scaled input alike; a model
  with learned variance (PixArt) gives its eps in the first C channels.
- flow models (SD3, Flux: x_t = (1 - sigma) x0 + sigma * noise, velocity v = noise - x0, sigma read
  from the scheduler at the step): x0 = x - sigma v, noise = x + (1 - sigma) v, and the re-noised
  sample is (1 - sigma) x0_deg + sigma * noise (`flow_x0_noise`, `flow_renoise`).
- joint attention (SD3, Flux): the map is the image-to-image block of the joint map, renormalised
  over the image keys (the softmax restricted to image tokens), so threshold 1 is still the average.
- packed latents (Flux's 2x2 patch tokens) are blurred as the latent image they pack.
- without CFG (Flux) the cond branch gives the map, x0_hat and the degraded pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.attention import AttnCall, Control, StepWindow, attention_layers, select_layers
from attnlab.control.common import (
    as_patterns,
    check_choice,
    check_positive,
    extra_pass,
    grid_tokens,
    is_main_pass,
    require_layers,
    resize,
    rows,
    window,
)
from attnlab.control.pag import UNET_LAYERS, transformer_blocks
from attnlab.diffusion import add_noise, predict_eps, predict_x0
from attnlab.errors import ConfigError
from attnlab.techniques import register

SAG_ROLE = "sag"
BRANCHES = ("uncond", "cond")


def reference_layer(model: nn.Module) -> str:
    """SAG's default map for `model`, as a pattern: the mid block's first self-attention on a U-Net
    (diffusers reads `mid_block.attentions[0].transformer_blocks[0].attn1`), block depth // 2 on a DiT
    or a diffusers transformer (Flux: of its double-stream blocks)."""
    blocks = transformer_blocks(model)
    if blocks:
        return blocks[len(blocks) // 2]
    return "mid_block" if any(n.startswith("mid_block.") for n in attention_layers(model)) else UNET_LAYERS


def flow_x0_noise(x: Tensor, v: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """x0 and noise implied by a velocity v = noise - x0 at x = (1 - sigma) x0 + sigma * noise
    (rectified flow, SD3 / Flux): x0 = x - sigma v, noise = x + (1 - sigma) v."""
    return x - sigma * v, x + (1 - sigma) * v


def flow_renoise(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """The flow's forward process at sigma: (1 - sigma) x0 + sigma * noise."""
    return (1 - sigma) * x0 + sigma * noise


def gaussian_blur_taps(x: Tensor, taps: int, sigma: float) -> Tensor:
    """Gaussian blur of (B, C, *spatial) with a `taps`-long kernel per dim, reflect-padded.

    In 2D this is diffusers' `gaussian_blur_2d(img, kernel_size=taps, sigma)` computed separably;
    a dim shorter than taps // 2 + 1 is replicate-padded, where reflect padding is undefined.
    """
    r = taps // 2
    pos = torch.arange(taps, dtype=torch.float32) - r
    k = torch.exp(-0.5 * (pos / sigma) ** 2)
    k = (k / k.sum()).to(x).view(1, 1, -1)  # (1, 1, taps)
    for d in range(2, x.dim()):
        moved = x.movedim(d, -1)  # (B, C, ..., n_d)
        flat = moved.reshape(-1, 1, moved.shape[-1])  # (B*C*rest, 1, n_d)
        flat = F.pad(flat, (r, r), mode="reflect" if moved.shape[-1] > r else "replicate")
        x = F.conv1d(flat, k).reshape(moved.shape).movedim(-1, d)
    return x


@dataclass(eq=False)
class AttentionMassRecorder(Control):
    """Keeps the attention each key token receives on the main pass: (B, *grid) per layer.

    The mass of key j is sum_i mean_heads(A)[i, j]; SAG's mask is mass > 1 (above the average).
    It is read on the "uncond" rows when the pass has them and `branch` is "uncond", else on the
    "cond" rows. The layer runs the explicit softmax path for the whole batch on those passes (the
    probability hooks see every row), which is why the default reads one layer only.
    """

    layers: tuple[str, ...] | None = None
    window: StepWindow = field(default_factory=StepWindow)
    enabled: bool = True
    branch: str = "uncond"

    def __post_init__(self):
        self.kind = "self"
        self.mass: dict[str, Tensor] = {}

    def select(self, model: nn.Module):
        patterns = self.layers or (reference_layer(model),)
        found = select_layers(model, patterns, ("self", "joint"))
        require_layers("sag", model, found, patterns, "self")
        return found if self.layers else found[:1]  # the reference reads one map

    def on_install(self, model: nn.Module, layers) -> None:
        merged = [m.name for m in layers if any(c.changes_tokens for c in m.controls)]
        if merged:
            raise ConfigError(
                f"sag reads the full self-attention map of {merged[0]}, where token merging leaves fewer "
                "tokens: drop one, or keep tome off that layer (tome.layers or tome.max_downsample)"
            )

    def role(self, call: AttnCall) -> str:
        return "uncond" if self.branch == "uncond" and "uncond" in call.roles else "cond"

    def active(self, call: AttnCall) -> bool:
        steps_ok = self.window.contains(call.step, call.num_steps)  # maps only on steps that use them
        return self.enabled and steps_ok and is_main_pass(call)

    def needs_probs(self, call: AttnCall) -> bool:
        return True

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        a = rows(call, p, self.role(call)).detach()  # (B, heads, N, L)
        if call.image is not None:  # joint map: image queries to image keys, renormalised over them
            a = a[:, :, call.image, call.image]
            a = a / a.sum(-1, keepdim=True)
        n = a.shape[-1]
        if grid_tokens(call, n) and a.shape[-2] == n:
            mass = a.mean(1).sum(1)  # (B, N): mass per key
            self.mass[call.name] = mass.view(mass.shape[0], *call.grid)  # (B, *grid)
        return p


@register(
    "sag",
    level=5,
    paper="SAG (Hong et al., ICCV 2023, arXiv:2210.00939)",
    training_free=True,
    provides=("guidance",),
    summary="guide away from an unconditional pass blurred where the middle self-attention map "
    "attends (as diffusers): finer detail, one extra forward per step",
    modality_notes={
        "points": "blurs the sample on its grid where self-attention is high; a point cloud has no grid to blur",
        "tokens": "blurs the continuous latent where self-attention is high; token ids have no latent to blur",
    },
)
@dataclass(eq=False)
class SAG:
    """Self-attention guidance term, a plug-in for `attnlab.diffusion.sample(guidances=...)`.

    Args:
        scale: guidance strength s in out + s * (out_branch - out_degraded); 0 turns it off.
        layers: None (the default) reads the reference's one map: the U-Net mid block's first
            self-attention, or on a DiT block depth // 2 ("blocks.1" of 2, "blocks.6" of 12).
            Patterns (e.g. "**", every self-attention) read each matched layer's map and take the
            union of their masks, a variant the reference does not have.
        branch: "uncond" (the reference): under CFG, the mask, x0_hat and the degraded pass come
            from the unconditional rows, without CFG from the conditional ones; "cond": always the
            conditional rows, a variant.
        blur_taps: the length of the Gaussian kernel per dim (odd; diffusers: 9).
        blur_sigma: its standard deviation, in latent samples/pixels (diffusers: 1.0).
        threshold: a token is masked when the attention it receives exceeds this (1 = average).
        start, end: the step window, as fractions of the run.

    attnlab's former default, every layer's mask on the cond branch with a 7-tap blur, is
    `SAG(layers="**", branch="cond", blur_taps=7)`.
    """

    scale: float = 0.75
    layers: str | tuple[str, ...] | None = None
    branch: Literal["uncond", "cond"] = "uncond"
    blur_taps: int = 9
    blur_sigma: float = 1.0
    threshold: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        check_positive("sag", "scale", self.scale, allow_zero=True)
        check_positive("sag", "blur_sigma", self.blur_sigma)
        check_choice("sag", "branch", self.branch, BRANCHES)
        if not isinstance(self.blur_taps, int) or self.blur_taps < 1 or self.blur_taps % 2 == 0:
            raise ConfigError(f"sag: blur_taps must be an odd positive integer, got {self.blur_taps!r}")
        self.window = window(self.start, self.end, "sag")
        self.layers = None if self.layers is None else as_patterns(self.layers)
        self._recorder = AttentionMassRecorder(self.layers, self.window, self.scale != 0, self.branch)
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
        return torch.stack(up).amax(0)  # union over the chosen layers (one by default)

    def correction(self, model, x_in: Tensor, t: Tensor, cond, out: dict, ctx: dict) -> Tensor:
        to_image, from_image = ctx.get("to_image", _same), ctx.get("from_image", _same)
        x = to_image(x_in)  # (B, C, *spatial): packed latents as the image they pack
        mask = self.mask(tuple(x.shape[2:]))
        self._recorder.mass.clear()
        if mask is None:
            self.skipped += 1
            return torch.zeros_like(out["cond"])  # the map was not computed this step (e.g. cached)
        on_uncond = self.branch == "uncond" and "uncond" in out  # the recorder read the same rows
        pred = out["uncond"] if on_uncond else out["cond"]
        x0, eps = self._x0_eps(x, to_image(pred)[:, : x.shape[1]], ctx)  # learned variance: drop it
        x0_deg = torch.lerp(x0, gaussian_blur_taps(x0, self.blur_taps, self.blur_sigma), mask.to(x0))
        x_deg = from_image(self._renoise(x0_deg, eps, ctx))
        with extra_pass(model, (SAG_ROLE,), ctx, t):
            degraded = model(x_deg, t, cond.null_like() if on_uncond else cond)
        return self.scale * (pred - degraded)

    @staticmethod
    def _x0_eps(x: Tensor, pred: Tensor, ctx: dict) -> tuple[Tensor, Tensor]:
        kind = ctx["prediction_type"]
        if kind == "flow":
            return flow_x0_noise(x, pred, _bcast(ctx["sigma"], x))
        ab = ctx["alpha_bar_t"]
        return predict_x0(kind, x, pred, ab), predict_eps(kind, x, pred, ab)

    @staticmethod
    def _renoise(x0: Tensor, eps: Tensor, ctx: dict) -> Tensor:
        if ctx["prediction_type"] == "flow":
            return flow_renoise(x0, eps, _bcast(ctx["sigma"], x0))
        return add_noise(x0, eps, ctx["alpha_bar_t"])  # the scheduler's, for a VP schedule


def _same(x: Tensor) -> Tensor:
    return x


def _bcast(a, like: Tensor) -> Tensor:
    a = torch.as_tensor(a, device=like.device)
    return a.to(like.dtype).reshape(-1, *[1] * (like.dim() - 1))  # (B or 1, 1, ..., 1)
