"""Shared backbone blocks: the residual block with scale-shift conditioning (ADM, Dhariwal & Nichol
2021), resampling, and the transformer block over tokens, pre-norm or adaLN-Zero (DiT, Peebles & Xie 2023).

Layout: every feature map is 4D (B, C, H, W) in channels-last memory, and 1D data is carried as
(B, C, 1, T). One set of kernels then serves both modalities, and channels-last 2D convolutions
are the fastest convolutions PyTorch has on CPU (a (1, 3) kernel is a 1D convolution). In
channels-last memory a map is already its token sequence, so attention blocks reshape for free.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.attention import Attention
from attnlab.models.specs import AttnSpec
from attnlab.precision import low_precision

Context = tuple[Tensor, Tensor] | None  # (tokens (B, L, D), mask (B, L) bool) for cross-attention

# Layout


def as_map(x: Tensor, dims: int) -> Tensor:
    """Data (B, C, H, W) or (B, C, T) -> channels-last (B, C, H, W), audio as H = 1."""
    x = x.unsqueeze(2) if dims == 1 else x  # (B, C, 1, T)
    return x.contiguous(memory_format=torch.channels_last)


def from_map(x: Tensor, dims: int) -> Tensor:
    """The inverse of `as_map`, returned in standard contiguous memory."""
    x = x.squeeze(2) if dims == 1 else x
    return x.contiguous()


def grid_of(x: Tensor, dims: int) -> tuple[int, ...]:
    """The token grid a (B, C, H, W) map stands for: (H, W) for images, (T,) for audio."""
    return tuple(x.shape[2:]) if dims == 2 else (x.shape[3],)


def to_tokens(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, H*W, C); a view of a channels-last map


def to_map(tokens: Tensor, h: int, w: int) -> Tensor:
    b, _, c = tokens.shape
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last


def conv_nd(dims: int, cin: int, cout: int, k: int, stride: int = 1, padding: int | None = None) -> nn.Conv2d:
    """A k-wide convolution over H and W (dims=2) or over T only (dims=1); padding k // 2 by default."""
    pad = k // 2 if padding is None else padding
    if dims == 2:
        return nn.Conv2d(cin, cout, k, stride=stride, padding=pad)
    return nn.Conv2d(cin, cout, (1, k), stride=(1, stride), padding=(0, pad))


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (the same parameters and checkpoints) that normalises a bf16 / fp16 map in fp32
    and hands it back in its own dtype: the statistics stay exact, and on a CPU PyTorch's group norm
    over a channels-last bf16 map runs about 4x slower (forward + backward) than over the same map
    converted to fp32."""

    def forward(self, x: Tensor) -> Tensor:
        if not low_precision(x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def group_norm(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(math.gcd(groups, channels), channels)


def zero_(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so its residual branch starts at nothing (ADM's zero_module)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# Convolutional blocks


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, then a norm scaled and shifted by the embedding, SiLU-conv; plus the skip.

    Args:
        cin, cout: channels in and out.
        emb_dim: width of the conditioning vector (time + class or pooled text).
        dims: 1 or 2 (see the module docstring).
        groups: GroupNorm groups.
    """

    def __init__(self, cin: int, cout: int, emb_dim: int, dims: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(cin, groups)
        self.conv1 = conv_nd(dims, cin, cout, 3)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = group_norm(cout, groups)
        self.conv2 = zero_(conv_nd(dims, cout, cout, 3))
        self.skip = conv_nd(dims, cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, cin, H, W); emb: (B, emb_dim), already through SiLU. Returns (B, cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # 2 x (B, cout, 1, 1)
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)  # ADM scale-shift norm, one fused op
        return self.skip(x) + self.conv2(F.silu(h))


class Downsample(nn.Module):
    """Halve H and W (or T) with a stride-2 3-wide convolution."""

    def __init__(self, channels: int, dims: int):
        super().__init__()
        self.conv = conv_nd(dims, channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W (or T): nearest-neighbour repeat, then a 3-wide convolution."""

    def __init__(self, channels: int, dims: int):
        super().__init__()
        self.scale = (2.0, 2.0) if dims == 2 else (1.0, 2.0)
        self.conv = conv_nd(dims, channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


# Transformer block


ATTENTION_SUBLAYERS = ("self", "chan", "cross")


class TransformerBlock(nn.Module):
    """Residual sub-layers over tokens as `spec` lists them: self-attention "self", channel attention
    "chan", cross-attention "cross" (to the condition tokens), MLP "mlp".

    With spec.modulation == "adaln_zero" each sub-layer's norm is scaled and shifted, and its output
    gated, by values regressed from the conditioning vector; the regression starts at zero, so the
    block starts as the identity (DiT's adaLN-Zero). Otherwise the norms are learned and the output
    projections start at zero, which makes the block start as the identity too. A time gate, if the
    spec has one, further scales each attention residual.

    Args:
        dim: token width.
        spec: what the block contains.
        emb_dim: width of the conditioning vector (needed for adaLN-Zero).
        context_dim: width of the condition tokens (needed for cross-attention).
    """

    def __init__(self, dim: int, spec: AttnSpec, emb_dim: int | None = None, context_dim: int | None = None):
        super().__init__()
        self.spec, self.subs = spec, spec.sublayers()
        adaln = spec.modulation == "adaln_zero"
        self.norms = nn.ModuleList(
            nn.LayerNorm(dim, elementwise_affine=not adaln, eps=1e-6) for _ in self.subs
        )
        if spec.self_attn:
            rotary = spec.rotary(dim, spec.heads) if spec.rotary is not None else None
            self.add_module("self", Attention(dim, spec.heads, kernel=spec.mixer, rotary=rotary))
        if spec.channel_attn is not None:
            self.chan = spec.channel_attn(dim, spec.heads)
        if spec.cross_attn:
            self.add_module("cross", Attention(dim, spec.heads, context_dim=context_dim))
        if spec.mlp_ratio > 0:
            hidden = int(dim * spec.mlp_ratio)
            self.mlp = nn.Sequential(
                nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
            )
        self.ada = nn.Linear(emb_dim, 3 * len(self.subs) * dim) if adaln else None
        gated = tuple(n for n in self.subs if n in ATTENTION_SUBLAYERS)
        self.time_gate = spec.time_gate(emb_dim, dim, gated) if spec.time_gate is not None else None
        self.zero_init()

    def zero_init(self) -> None:
        """Make the block the identity: zero the adaLN regression, or else every output projection."""
        if self.ada is not None:
            zero_(self.ada)
        else:
            for name in self.subs:
                zero_(self._out_proj(name))
        if self.time_gate is not None:
            self.time_gate.reset_parameters()

    def _out_proj(self, name: str) -> nn.Linear:
        layer = getattr(self, name)
        return layer[-1] if name == "mlp" else layer.to_out

    def forward(
        self,
        x: Tensor,
        emb: Tensor | None,
        ctx: Context,
        grid: tuple[int, ...],
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """x: (B, N, dim) tokens on `grid` (then any extra tokens); emb: (B, emb_dim) after SiLU; ctx:
        condition tokens and mask; key_mask: (B, N) bool, False for padding tokens among x's extras."""
        mods = self.ada(emb)[:, None].chunk(3 * len(self.subs), dim=-1) if self.ada is not None else None
        tgates = self.time_gate(emb) if self.time_gate is not None else None  # name -> (B, 1, dim)
        for i, name in enumerate(self.subs):
            h = self.norms[i](x)
            if mods is not None:
                shift, scale, gate = mods[3 * i : 3 * i + 3]  # 3 x (B, 1, dim)
                h = self._run(name, torch.addcmul(shift, h, 1 + scale), ctx, grid, key_mask, x)
            else:
                gate, h = None, self._run(name, h, ctx, grid, key_mask, x)
            if tgates is not None and name in tgates:
                gate = tgates[name] if gate is None else gate * tgates[name]
            x = x + h if gate is None else torch.addcmul(x, gate, h)  # x + gate * sublayer(...)
        return x

    def _run(
        self,
        name: str,
        h: Tensor,
        ctx: Context,
        grid: tuple[int, ...],
        key_mask: Tensor | None,
        x: Tensor,
    ) -> Tensor:
        if name == "self":  # x, before the norm: what token merging measures similarity on (tomesd)
            return self.self(h, None, key_mask, grid=grid, pre_norm=x)
        if name == "chan":
            return self.chan(h)
        if name == "cross":
            return self.cross(h, ctx[0], ctx[1], grid=grid)
        return self.mlp(h)
