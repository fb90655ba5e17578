"""How the timestep enters the backbone (U-ViT, Bao et al. 2023, arXiv:2209.12152, compares them):
added to the features (DDPM, Ho et al. 2020), modulating every norm with adaLN-Zero (DiT, Peebles &
Xie 2023), or as one more token that attention reads (U-ViT). The base models use scale-shift norms
(U-Net, ADM) and adaLN-Zero (DiT)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.errors import ConfigError
from attnlab.models.blocks import ResBlock
from attnlab.models.specs import AttnSpec, Where
from attnlab.techniques import register

MODES = {"unet": ("scale_shift", "add", "adaln_zero"), "dit": ("adaln_zero", "add", "token")}
MODES["points"] = MODES["dit"]
MODES["tokens"] = ("adaln_zero", "add", "token", "none")  # "none": no time input (MDLM, LLaDA)


class AdditiveResBlock(ResBlock):
    """A residual block whose embedding is a per-channel bias after the first convolution (DDPM),
    instead of a scale and shift of the second norm (ADM)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dims: int, groups: int):
        super().__init__(cin, cout, emb_dim, dims, groups)
        self.emb = nn.Linear(emb_dim, cout)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]  # (B, cout, H, W)
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class TimeInput(nn.Module):
    """DiT: the conditioning vector (time, plus class or pooled text) joins the patch tokens, added to
    each ("add") or appended as one token after them ("token", U-ViT); the blocks are then plain
    pre-norm blocks. `strip` drops the token again before the final layer.

    Args:
        mode: "add" or "token".
        dim: token width.
    """

    reads_time = True  # the backbone embeds the timestep for it

    def __init__(self, mode: str, dim: int):
        super().__init__()
        self.mode = mode
        self.proj = nn.Linear(dim, dim)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        """h: (B, N, dim) tokens, c: (B, dim) -> (B, N, dim) or (B, N + 1, dim)."""
        e = self.proj(c)[:, None]  # (B, 1, dim)
        return h + e if self.mode == "add" else torch.cat([h, e], dim=1)


class NoTime(nn.Module):
    """The token backbone without a time input: masked diffusion reads the noise level off the share
    of masked tokens (MDLM Sec. 3.2.3, LLaDA), so the tokens pass unchanged and no timestep is embedded."""

    reads_time = False

    def forward(self, h: Tensor, c: Tensor | None) -> Tensor:
        return h


@register(
    "time_embedding",
    level=3,
    paper="U-ViT time as a token (Bao et al., 2023, arXiv:2209.12152); DDPM addition; DiT adaLN-Zero",
    training_free=False,
    provides=("check", "edit_spec", "res_block", "time_input"),
    summary=(
        "how the timestep enters: U-Net add or adaln_zero (base: scale_shift); DiT add or token "
        "(base: adaln_zero); token/add drop adaLN's 6 dim^2 parameters per block; tokens: also none"
    ),
    hosts=("unet", "dit"),
    modalities=(1, 2, "tokens", "points"),
)
@dataclass
class TimeEmbedding:
    """The timestep's way into the backbone.

    Args:
        mode: U-Net: "scale_shift" (base: every residual block scales and shifts a norm), "add" (a
            per-channel bias in every residual block), "adaln_zero" (scale_shift, and the attention
            blocks get adaLN-Zero too). DiT: "adaln_zero" (base), "add" (added to every patch token
            once, before the blocks), "token" (one extra token, read only through attention).
            Tokens: the DiT's three, and "none" (no time input at all).
    """

    mode: str = "add"

    def check(self, cfg) -> None:
        allowed = MODES[cfg.backbone]
        if self.mode not in allowed:
            raise ConfigError(
                f"model.techniques.time_embedding.mode={self.mode!r} is not allowed for the {cfg.backbone} "
                f"backbone: expected one of {', '.join(allowed)}"
            )

    def edit_spec(self, spec: AttnSpec, where: Where) -> AttnSpec:
        if self.mode == "adaln_zero":
            return dataclasses.replace(spec, modulation="adaln_zero")
        if where.side == "block" and self.mode in ("add", "token", "none"):
            return dataclasses.replace(spec, modulation="none")
        return spec

    # Backbone hooks

    def res_block(self) -> type[ResBlock]:
        """U-Net: the residual block class."""
        return AdditiveResBlock if self.mode == "add" else ResBlock

    def time_input(self, dim: int) -> TimeInput | None:
        """DiT: the module that puts the conditioning vector into the tokens, or None (adaLN-Zero)."""
        if self.mode == "none":
            return NoTime()
        return TimeInput(self.mode, dim) if self.mode in ("add", "token") else None
