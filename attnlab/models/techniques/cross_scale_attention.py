"""Cross-scale attention in the U-Net decoder: decoder tokens at one resolution attend to the encoder
tokens of another (finer: detail, coarser: context), beyond the same-size skip (in the spirit of
the multi-scale attention of CrossViT, Chen et al. 2021, arXiv:2103.14899, and of Swin-UNet style
decoders). The layer's kind is "xscale", so text-reading controls leave it alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from attnlab.attention import Attention
from attnlab.errors import ConfigError
from attnlab.models.blocks import grid_of, to_map, to_tokens, zero_
from attnlab.models.techniques.scope import Scope
from attnlab.techniques import register

SOURCES = ("finer", "coarser")


class CrossScaleAttention(nn.Module):
    """x + attn(norm(x tokens), norm(encoder tokens at `source` size)), the output zero at init.

    Args:
        dim: channels of the decoder map.
        source_dim: channels of the encoder map it reads.
        source: feature size of that encoder map.
        heads: attention heads.
        dims: 1 or 2.
    """

    def __init__(self, dim: int, source_dim: int, source: int, heads: int, dims: int):
        super().__init__()
        self.source, self.dims = source, dims
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.norm_source = nn.LayerNorm(source_dim, eps=1e-6)
        self.xscale = Attention(dim, heads, context_dim=source_dim, kind="xscale")
        zero_(self.xscale.to_out)  # starts as the plain decoder

    def forward(self, x: Tensor, encoder: dict[int, Tensor]) -> Tensor:
        """x: (B, C, H, W) decoder map; encoder: encoder maps by feature size. Returns x's shape."""
        _, _, h, w = x.shape
        tokens = to_tokens(x)  # (B, H*W, C)
        context = self.norm_source(to_tokens(encoder[self.source]))  # (B, N_source, C_source)
        out = tokens + self.xscale(self.norm(tokens), context, grid=grid_of(x, self.dims))
        return to_map(out, h, w)


@register(
    "cross_scale_attention",
    level=4,
    paper="multi-scale cross-attention (CrossViT, Chen et al., 2021, arXiv:2103.14899) in a U-Net decoder",
    training_free=False,
    provides=("check", "cross_scale"),
    hosts=("unet",),
    summary=(
        "decoder tokens attend to encoder tokens of the next finer (or coarser) resolution: "
        "long-range detail transfer; O(N_dec N_enc) per layer"
    ),
    modality_notes={
        "points": "reads U-Net encoder maps of other resolutions; the points backbone has one set of group tokens",
        "tokens": "reads encoder maps of other resolutions; a token sequence has one resolution",
    },
)
@dataclass
class CrossScale:
    """Cross-scale attention after every up block of the selected decoder levels.

    Args:
        source: "finer" (the encoder map at twice the size) or "coarser" (half the size).
        resolutions: decoder feature sizes that get it (None: every level that has such a source).
    """

    source: Literal["finer", "coarser"] = "finer"
    resolutions: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ConfigError(
                f"model.techniques.cross_scale_attention.source={self.source!r} is not allowed: "
                f"expected one of {', '.join(SOURCES)}"
            )
        self.scope = Scope("cross_scale_attention", self.resolutions, None)

    def source_size(self, cfg, size: int) -> int | None:
        """The encoder feature size a decoder level of `size` reads, or None where there is none."""
        s = 2 * size if self.source == "finer" else size // 2
        return s if s in cfg.feature_sizes() and s != size else None

    def check(self, cfg) -> None:
        self.scope.check(cfg)
        sizes = self.resolutions if self.resolutions is not None else cfg.feature_sizes()
        lacking = [s for s in sizes if self.source_size(cfg, s) is None]
        if self.resolutions is not None and lacking:
            raise ConfigError(
                f"model.techniques.cross_scale_attention.resolutions: level {lacking[0]} has no {self.source} "
                f"encoder level among {cfg.feature_sizes()}"
            )
        if len(lacking) == len(sizes):
            raise ConfigError(
                f"model.techniques.cross_scale_attention: no level has a {self.source} encoder level "
                f"among {cfg.feature_sizes()}"
            )

    def cross_scale(self, cfg, size: int, dim: int) -> CrossScaleAttention | None:
        """U-Net: the cross-scale layer of an up block at feature size `size`, or None."""
        source = self.source_size(cfg, size)
        if source is None or (self.resolutions is not None and size not in self.resolutions):
            return None
        level = cfg.feature_sizes().index(source)
        return CrossScaleAttention(dim, cfg.width * cfg.channel_mult[level], source, cfg.heads, cfg.dims)
