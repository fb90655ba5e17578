"""A point transformer denoiser for 3D point clouds: farthest-point sampling and k-nearest-neighbour
grouping as the patchify of points (PointNet++, Qi et al. 2017; Point-MAE, Pang et al. 2022),
Fourier features of coordinates in place of index positions (Tancik et al. 2020), DiT blocks with
adaLN-Zero on the time (Peebles & Xie 2023) and cross-attention to text, then per-point decoding
by inverse-distance interpolation of the group tokens (PointNet++ feature propagation).

Equivariant to permuting the input points: sampling starts at the point farthest from the
centroid, so the centres (and their order) depend on the cloud, not on its order; a group is pooled
with a max over its members; every per-point map is applied point by point. The model holds no
table indexed by position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.attention import name_layers, reading_points
from attnlab.conditioning import Condition
from attnlab.models.blocks import Context, TransformerBlock, zero_
from attnlab.models.config import ModelConfig
from attnlab.models.dit import FinalLayer
from attnlab.models.embeddings import CondEmbedding, TimestepEmbedding, batch_timesteps
from attnlab.models.plan import ModelPlan, resolve
from attnlab.precision import autocast

FOURIER_BANDS = 8  # octaves of the coordinate features: periods from 2 down to 2 / 2**7


# Grouping


def farthest_point_sample(p: Tensor, m: int) -> Tensor:
    """(B, N, 3) points -> (B, m) indices of m centres, each the point farthest from those chosen
    before it; the first is the point farthest from the centroid (a canonical start)."""
    b, n, _ = p.shape
    dist = (p - p.mean(dim=1, keepdim=True)).square().sum(-1)  # (B, N)
    idx = torch.empty(b, m, dtype=torch.long, device=p.device)
    nearest = torch.full((b, n), float("inf"), device=p.device, dtype=p.dtype)
    rows = torch.arange(b, device=p.device)
    for i in range(m):
        idx[:, i] = dist.argmax(dim=1) if i == 0 else nearest.argmax(dim=1)
        d = (p - p[rows, idx[:, i]][:, None]).square().sum(-1)  # (B, N) to the new centre
        nearest = torch.minimum(nearest, d)
    return idx


def knn(query: Tensor, p: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(B, M, 3) queries, (B, N, 3) points -> (B, M, k) squared distances and indices of each query's
    k nearest points, nearest first."""
    d = torch.cdist(query, p).square()  # (B, M, N)
    dist, idx = d.topk(k, dim=-1, largest=False)
    return dist, idx


def gather(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, N, C), idx (B, *S) -> (B, *S, C)."""
    b = x.shape[0]
    flat = idx.reshape(b, -1)  # (B, S)
    out = torch.gather(x, 1, flat[..., None].expand(-1, -1, x.shape[-1]))
    return out.reshape(*idx.shape, x.shape[-1])


class Grouping(nn.Module):
    """The centres and neighbourhoods of one cloud, and the weights that spread group tokens back to
    the points (inverse squared distance to the 3 nearest centres). Recomputed at every call from
    the (noisy) input itself."""

    def __init__(self, groups: int, neighbours: int):
        super().__init__()
        self.groups, self.neighbours = groups, neighbours

    def forward(self, p: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """p: (B, N, 3). Returns centres (B, G, 3), neighbour indices (B, G, k), and per point the
        indices (B, N, 3) and weights (B, N, 3) of its nearest centres."""
        centres = gather(p, farthest_point_sample(p.detach(), self.groups))  # (B, G, 3)
        _, members = knn(centres.detach(), p.detach(), self.neighbours)  # (B, G, k)
        d, near = knn(p.detach(), centres.detach(), min(3, self.groups))  # (B, N, 3)
        w = 1.0 / (d + 1e-8)
        return centres, members, near, w / w.sum(-1, keepdim=True)


# Coordinate features


class FourierFeatures(nn.Module):
    """Coordinates (..., 3) -> (..., dim): sin and cos of each coordinate at octave frequencies
    pi * 2**j, j < FOURIER_BANDS, with the coordinates themselves, then a linear map."""

    def __init__(self, dim: int, bands: int = FOURIER_BANDS):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(bands), persistent=False)
        self.proj = nn.Linear(3 * (2 * bands + 1), dim)

    def forward(self, p: Tensor) -> Tensor:
        a = (p[..., None] * self.freqs).flatten(-2)  # (..., 3 * bands)
        return self.proj(torch.cat([p, a.sin(), a.cos()], dim=-1))


class GroupEncoder(nn.Module):
    """A group token: a max over its members of an MLP on their Fourier features relative to the
    centre (a mini-PointNet, as Point-MAE embeds a patch), plus the centre's own features."""

    def __init__(self, dim: int):
        super().__init__()
        self.local = FourierFeatures(dim)
        self.mlp = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.where = FourierFeatures(dim)

    def forward(self, p: Tensor, centres: Tensor, members: Tensor) -> Tensor:
        rel = gather(p, members) - centres[:, :, None]  # (B, G, k, 3)
        local = self.mlp(self.local(4.0 * rel)).amax(dim=2)  # (B, G, dim): neighbourhoods are small
        return local + self.where(centres)


class PointBlock(nn.Module):
    """A per-point residual MLP with adaLN-Zero on the conditioning vector (the decoder's block)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim)
        )
        self.ada = zero_(nn.Linear(dim, 3 * dim))

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        shift, scale, gate = self.ada(c)[:, None].chunk(3, dim=-1)  # 3 x (B, 1, dim)
        return torch.addcmul(h, gate, self.mlp(torch.addcmul(shift, self.norm(h), 1 + scale)))


class PointTransformer(nn.Module):
    """The points denoiser over (B, 3, N) clouds.

    Attention layers are named "blocks.{i}.self" and "blocks.{i}.cross", over the G group tokens
    (their grid is (G,), in farthest-point order). During a forward the bus holds how each point
    reads the group tokens (`AttnCall.point_weights`), so a control can spread a token's attention
    onto the points of that very call.

    Args:
        cfg: the model config (backbone="points"): width is the token width, depth the number of
            transformer blocks, `groups` the number of centres G, `patch` the neighbours k per group.
        plan: its techniques resolved (`attnlab.models.plan.resolve(cfg)`, the default).
    """

    def __init__(self, cfg: ModelConfig, plan: ModelPlan | None = None):
        super().__init__()
        self.config, d = cfg, cfg.width
        self.grid = (cfg.point_groups(),)
        plan = plan if plan is not None else resolve(cfg)
        self.grouping = Grouping(cfg.point_groups(), cfg.patch)
        self.encode = GroupEncoder(d)
        self.time_embed = TimestepEmbedding(256, d)
        self.cond_embed = CondEmbedding(cfg.cond, d, cfg.num_classes, cfg.context_dim, d)
        self.blocks = nn.ModuleList(TransformerBlock(d, s, d, d) for s in plan.dit_block_specs())
        self.in_context = plan.condition_tokens()
        self.time_input = plan.time_input(d)
        self.long_skips = plan.run_blocks(cfg.depth, d)
        self.point_in = FourierFeatures(d)
        self.lift = nn.Linear(d, d)  # the spread group tokens, added to each point's features
        self.decode = nn.ModuleList(PointBlock(d) for _ in range(2))
        self.final = FinalLayer(d, cfg.in_channels)
        self.init_weights()
        name_layers(self)

    def init_weights(self) -> None:
        """DiT's initialisation (xavier-uniform linears, N(0, 0.02) embeddings), then zero on every
        adaLN regression and the output layer: the model starts at zero output (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.time_embed.mlp[0], self.time_embed.mlp[2]:
            nn.init.normal_(m.weight, std=0.02)
        if self.config.cond == "class":
            nn.init.normal_(self.cond_embed.table.weight, std=0.02)
        for blk in self.blocks:
            blk.zero_init()
        for blk in self.decode:
            zero_(blk.ada)
        zero_(self.final.ada)
        zero_(self.final.linear)

    def embed(self, t: Tensor, cond: Condition | None, batch: int) -> tuple[Tensor, Context]:
        """SiLU(time + class / pooled text) (B, width) and the cross-attention context (as the DiT's)."""
        vec, tokens, mask = self.cond_embed(cond, batch)
        c = self.time_embed(batch_timesteps(t, batch, self.lift.weight.device))
        if self.in_context is not None:
            return F.silu(c), self.in_context.condition_tokens(vec, tokens, mask)
        c = c if vec is None else c + vec
        return F.silu(c), (tokens, mask) if tokens is not None else None

    precision = "fp32"

    def forward(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        """Args:
            x: (B, 3, N) point clouds (channels first, like audio's (B, C, T)).
            t: (B,) timesteps in [0, 1000), or one shared by the batch.
            cond: labels and/or text tokens; None or missing fields mean the null condition.
        Returns:
            The prediction (B, 3, N), in x's dtype, computed in `self.precision`.
        """
        with autocast(self.precision, x.device):
            return self._forward(x, t, cond).to(x.dtype)

    def _forward(self, x: Tensor, t: Tensor, cond: Condition | None) -> Tensor:
        c, ctx = self.embed(t, cond, x.shape[0])
        p = x.transpose(1, 2).float()  # (B, N, 3)
        centres, members, near, w = self.grouping(p)
        h = self.encode(p, centres, members)  # (B, G, width)
        g, key_mask = h.shape[1], None
        if self.time_input is not None:
            h = self.time_input(h, c)
        if self.in_context is not None:
            (h, key_mask), ctx = self.in_context.join(h, ctx), None
        with reading_points(self, near, w):  # for controls that map token attention onto the points
            h = self.run_blocks(h, c, ctx, key_mask)[:, :g]  # (B, G, width)
        spread = (gather(h, near) * w[..., None]).sum(2)  # (B, N, width)
        hp = self.point_in(p) + self.lift(spread)
        for blk in self.decode:
            hp = blk(hp, c)
        return self.final(hp, c).transpose(1, 2)  # (B, 3, N)

    def run_blocks(self, h: Tensor, c: Tensor, ctx: Context, key_mask: Tensor | None = None) -> Tensor:
        if self.long_skips is not None:
            return self.long_skips(self.blocks, h, c, ctx, self.grid, key_mask)
        for blk in self.blocks:
            h = blk(h, c, ctx, self.grid, key_mask)
        return h

    def point_weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(near (B, N, 3), weights (B, N, 3)): how each point of `x` (B, 3, N) reads the group tokens;
        a per-token map m (B, G) reads per point as (m[near] * weights).sum(-1)."""
        _, _, near, w = self.grouping(x.transpose(1, 2).float())
        return near, w
