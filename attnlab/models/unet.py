"""The U-Net denoiser (Ronneberger et al. 2015, as used by DDPM and ADM): residual blocks conditioned
on the timestep, self-attention at chosen resolutions, cross-attention to text tokens, skip connections."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.attention import name_layers
from attnlab.conditioning import Condition
from attnlab.models.blocks import (
    Context,
    Downsample,
    ResBlock,
    TransformerBlock,
    Upsample,
    as_map,
    conv_nd,
    from_map,
    grid_of,
    group_norm,
    to_map,
    to_tokens,
    zero_,
)
from attnlab.models.config import ModelConfig
from attnlab.models.embeddings import CondEmbedding, TimestepEmbedding, batch_timesteps
from attnlab.models.plan import ModelPlan, resolve
from attnlab.models.specs import AttnSpec
from attnlab.precision import autocast


class UNetBlock(nn.Module):
    """A residual block, then, where the spec asks for one, a transformer block over the map's tokens.

    Techniques may add: a gate on the skip map (`skip_gate(skip, x)`), a layer after the block
    that reads encoder maps of other resolutions (`cross_scale(x, encoder)`), and a position table
    added to the attention block's tokens (`positions(tokens)`).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        emb_dim: int,
        cfg: ModelConfig,
        spec: AttnSpec | None,
        context_dim: int,
        res_block: type[ResBlock] = ResBlock,
        skip_gate: nn.Module | None = None,
        cross_scale: nn.Module | None = None,
        positions: nn.Module | None = None,
    ):
        super().__init__()
        self.dims = cfg.dims
        self.res = res_block(cin, cout, emb_dim, cfg.dims, cfg.norm_groups)
        self.attn = TransformerBlock(cout, spec, emb_dim, context_dim) if spec is not None else None
        self.skip_gate, self.cross_scale, self.positions = skip_gate, cross_scale, positions

    def forward(
        self,
        x: Tensor,
        emb: Tensor,
        ctx: Context,
        skip: Tensor | None = None,
        encoder: dict[int, Tensor] | None = None,
    ) -> Tensor:
        """x: (B, cin, H, W), or with `skip` (an encoder map of the same size) their channel concat;
        `encoder`: the encoder maps by feature size, for a cross-scale layer."""
        if skip is not None:
            skip = skip if self.skip_gate is None else self.skip_gate(skip, x)
            x = torch.cat([x, skip], dim=1)  # (B, C_x + C_skip, H, W)
        x = self.res(x, emb)
        if self.attn is not None:
            _, _, h, w = x.shape
            tokens = to_tokens(x) if self.positions is None else self.positions(to_tokens(x))
            x = to_map(self.attn(tokens, emb, ctx, grid_of(x, self.dims)), h, w)
        return x if self.cross_scale is None else self.cross_scale(x, encoder)


class UNet(nn.Module):
    """U-Net over images (B, C, H, W) or audio (B, C, T).

    Level i works at feature size size / 2**i with width * channel_mult[i] channels. Down levels
    hold num_res_blocks blocks, up levels one more (each up block eats one skip); the middle is
    residual-attention-residual. Attention layers are named by module path, e.g. "down.1.attn.self",
    "mid.attn.cross", "up.4.attn.self".

    Args:
        cfg: the model config (backbone="unet").
        plan: its techniques resolved (`attnlab.models.plan.resolve(cfg)`, the default).
    """

    def __init__(self, cfg: ModelConfig, plan: ModelPlan | None = None):
        super().__init__()
        self.config, self.dims = cfg, cfg.dims
        emb_dim = 4 * cfg.width
        widths = [cfg.width * m for m in cfg.channel_mult]
        token_dim = max(widths)  # text tokens are projected to the widest level's width
        self.time_embed = TimestepEmbedding(cfg.width, emb_dim)
        self.cond_embed = CondEmbedding(cfg.cond, emb_dim, cfg.num_classes, cfg.context_dim, token_dim)
        self.conv_in = conv_nd(cfg.dims, cfg.in_channels, widths[0], 3)
        plan = plan if plan is not None else resolve(cfg)
        res_block = plan.res_block()
        # inpainting input (known data + region), added to the first map
        self.mask_in = plan.input_layer(cfg.in_channels, widths[0], lambda i, o: conv_nd(cfg.dims, i, o, 3))

        def positions(size: int, dim: int, spec: AttnSpec | None) -> nn.Module | None:
            if spec is None or not spec.self_attn:
                return None
            return plan.unet_positions((size,) * cfg.dims, dim)

        def block(cin: int, cout: int, size: int | None, side: str, skip: int = 0) -> UNetBlock:
            spec = plan.unet_attn_spec(size, side)
            up = side == "up"
            return UNetBlock(
                cin + skip,
                cout,
                emb_dim,
                cfg,
                spec,
                token_dim,
                res_block,
                plan.skip_gate(size, skip, cin) if up else None,
                plan.cross_scale(size, cout) if up else None,
                positions(size or cfg.feature_sizes()[-1], cout, spec),
            )

        self.down, skips, ch = nn.ModuleList(), [widths[0]], widths[0]
        for i, (w, size) in enumerate(zip(widths, cfg.feature_sizes())):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(ch, w, size, "down"))
                ch = w
                skips.append(ch)
            if i < len(widths) - 1:
                self.down.append(Downsample(ch, cfg.dims))
                skips.append(ch)
        self.mid = block(ch, ch, None, "mid")
        self.mid_out = res_block(ch, ch, emb_dim, cfg.dims, cfg.norm_groups)
        self.up = nn.ModuleList()
        for i, (w, size) in reversed(list(enumerate(zip(widths, cfg.feature_sizes())))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(block(ch, w, size, "up", skips.pop()))
                ch = w
            if i > 0:
                self.up.append(Upsample(ch, cfg.dims))
        self.out = nn.Sequential(
            group_norm(ch, cfg.norm_groups), nn.SiLU(), zero_(conv_nd(cfg.dims, ch, cfg.in_channels, 3))
        )
        self.needs_encoder = plan.reads_encoder
        name_layers(self)

    def embed(self, t: Tensor, cond: Condition | None, batch: int) -> tuple[Tensor, Context]:
        """The conditioning vector after SiLU (B, 4 * width) and the cross-attention context."""
        vec, tokens, mask = self.cond_embed(cond, batch)
        emb = self.time_embed(batch_timesteps(t, batch, self.conv_in.weight.device))
        emb = emb if vec is None else emb + vec
        return F.silu(emb), (tokens, mask) if tokens is not None else None

    precision = "fp32"  # how forward computes (attnlab.precision.set_precision); weights stay fp32

    def forward(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        """Args:
            x: (B, C, H, W) images or (B, C, T) audio.
            t: (B,) timesteps in [0, 1000) (float or long), or one shared by the batch.
            cond: labels and/or text tokens; None or missing fields mean the null condition.
        Returns:
            The prediction, shaped like x and in x's dtype, computed in `self.precision`.
        """
        with autocast(self.precision, x.device):
            return self._forward(x, t, cond).to(x.dtype)

    def _forward(self, x: Tensor, t: Tensor, cond: Condition | None) -> Tensor:
        emb, ctx = self.embed(t, cond, x.shape[0])
        x = as_map(x, self.dims)
        h = self.conv_in(x) if self.mask_in is None else self.conv_in(x) + self.mask_in(cond, x)
        skips = [h]
        for blk in self.down:
            h = blk(h, emb, ctx) if isinstance(blk, UNetBlock) else blk(h)
            skips.append(h)
        encoder = {m.shape[-1]: m for m in skips} if self.needs_encoder else None  # last map per size
        h = self.mid_out(self.mid(h, emb, ctx), emb)
        for blk in self.up:
            h = blk(h, emb, ctx, skips.pop(), encoder) if isinstance(blk, UNetBlock) else blk(h)
        return from_map(self.out(h), self.dims)
