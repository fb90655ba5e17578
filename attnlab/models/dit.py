"""The Diffusion Transformer (DiT, Peebles & Xie 2023, arXiv:2212.09748): patchify, fixed sin-cos
positions, transformer blocks with adaLN-Zero on time + class / pooled text, cross-attention to
text tokens, a zero-initialised final layer, unpatchify. Works on images and on 1D signals."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.attention import name_layers
from attnlab.conditioning import Condition
from attnlab.models.blocks import Context, TransformerBlock, as_map, conv_nd, to_tokens, zero_
from attnlab.models.config import ModelConfig
from attnlab.models.embeddings import CondEmbedding, TimestepEmbedding, batch_timesteps
from attnlab.models.plan import ModelPlan, resolve
from attnlab.precision import autocast


class FinalLayer(nn.Module):
    """adaLN-modulated norm (or a learned norm when the time enters the tokens instead), then a linear
    map from each token to its patch's values (zero at init)."""

    def __init__(self, dim: int, patch_values: int, modulated: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=not modulated, eps=1e-6)
        self.ada = nn.Linear(dim, 2 * dim) if modulated else None
        self.linear = nn.Linear(dim, patch_values)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        if self.ada is None:
            return self.linear(self.norm(x))
        shift, scale = self.ada(c)[:, None].chunk(2, dim=-1)  # 2 x (B, 1, dim)
        return self.linear(torch.addcmul(shift, self.norm(x), 1 + scale))


def unpatchify(tokens: Tensor, grid: tuple[int, ...], p: int, channels: int) -> Tensor:
    """(B, N, p**k * C) patch values on a k-D grid -> (B, C, H, W) images or (B, C, T) signals."""
    b = tokens.shape[0]
    if len(grid) == 1:
        x = tokens.reshape(b, grid[0], p, channels)  # (B, n, p, C)
        return x.permute(0, 3, 1, 2).reshape(b, channels, grid[0] * p).contiguous()
    h, w = grid
    x = tokens.reshape(b, h, w, p, p, channels)  # (B, h, w, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, h * p, w * p).contiguous()


class DiT(nn.Module):
    """A transformer denoiser over patches.

    Attention layers are named "blocks.{i}.self" and "blocks.{i}.cross".

    Args:
        cfg: the model config (backbone="dit"); width is the hidden size, depth the number of blocks.
        plan: its techniques resolved (`attnlab.models.plan.resolve(cfg)`, the default).
    """

    def __init__(self, cfg: ModelConfig, plan: ModelPlan | None = None):
        super().__init__()
        self.config, self.dims, d, p = cfg, cfg.dims, cfg.width, cfg.patch
        self.grid = (cfg.size // p,) * 2 if cfg.dims == 2 else (cfg.size // p,)
        self.patchify = conv_nd(cfg.dims, cfg.in_channels, d, p, stride=p, padding=0)
        plan = plan if plan is not None else resolve(cfg)
        self.set_positions(plan.dit_positions(self.grid, d))
        self.time_embed = TimestepEmbedding(256, d)
        self.cond_embed = CondEmbedding(cfg.cond, d, cfg.num_classes, cfg.context_dim, d)
        self.blocks = nn.ModuleList(TransformerBlock(d, s, d, d) for s in plan.dit_block_specs())
        self.in_context = plan.condition_tokens()  # the condition joins the tokens, or None
        # inpainting input (known data + region), added to every patch token
        self.mask_in = plan.input_layer(
            cfg.in_channels, d, lambda i, o: conv_nd(cfg.dims, i, o, p, stride=p, padding=0)
        )
        self.time_input = plan.time_input(d)  # the time in the tokens, or None (adaLN-Zero)
        self.long_skips = plan.run_blocks(cfg.depth, d)
        self.final = FinalLayer(d, p**cfg.dims * cfg.in_channels, modulated=self.time_input is None)
        self.init_weights()
        name_layers(self)

    def set_positions(self, pos: Tensor | None) -> None:
        """`pos`: the (1, N, dim) table added to the patch tokens (fixed sin-cos in DiT, a parameter when
        learned, None with rotary positions)."""
        if isinstance(pos, nn.Parameter):
            self.pos = pos
        else:
            self.register_buffer("pos", pos, persistent=False)

    def init_weights(self) -> None:
        """DiT's initialisation: xavier-uniform linears (the patch embedding as a linear map), N(0, 0.02)
        embeddings, then zero on every adaLN regression and the output layer, which makes each block
        the identity and the model output zero at the start (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patchify.weight.view(self.patchify.weight.shape[0], -1))
        nn.init.zeros_(self.patchify.bias)
        for m in self.time_embed.mlp[0], self.time_embed.mlp[2]:
            nn.init.normal_(m.weight, std=0.02)
        if self.config.cond == "class":
            nn.init.normal_(self.cond_embed.table.weight, std=0.02)
        for blk in self.blocks:
            blk.zero_init()
        if self.final.ada is not None:
            zero_(self.final.ada)
        zero_(self.final.linear)

    def embed(self, t: Tensor, cond: Condition | None, batch: int) -> tuple[Tensor, Context]:
        """The adaLN input SiLU(time + class / pooled-text embedding) (B, width) and the context
        (with in-context conditioning: SiLU(time) and the condition tokens with their mask)."""
        vec, tokens, mask = self.cond_embed(cond, batch)
        c = self.time_embed(batch_timesteps(t, batch, self.patchify.weight.device))
        if self.in_context is not None:  # the condition enters as tokens only
            return F.silu(c), self.in_context.condition_tokens(vec, tokens, mask)
        c = c if vec is None else c + vec
        return F.silu(c), (tokens, mask) if tokens is not None else None

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
        c, ctx = self.embed(t, cond, x.shape[0])
        x = as_map(x, self.dims)
        h = self.patchify(x) if self.mask_in is None else self.patchify(x) + self.mask_in(cond, x)
        h = to_tokens(h) if self.pos is None else to_tokens(h) + self.pos  # (B, N, width)
        n, key_mask = h.shape[1], None
        if self.time_input is not None:
            h = self.time_input(h, c)  # (B, N or N + 1, width): the time joins the tokens
        if self.in_context is not None:
            (h, key_mask), ctx = self.in_context.join(h, ctx), None  # the condition joins the tokens
        h = self.run_blocks(h, c, ctx, key_mask)[:, :n]  # tokens past the grid are dropped
        return unpatchify(self.final(h, c), self.grid, self.config.patch, self.config.in_channels)

    def run_blocks(self, h: Tensor, c: Tensor, ctx: Context, key_mask: Tensor | None = None) -> Tensor:
        if self.long_skips is not None:
            return self.long_skips(self.blocks, h, c, ctx, self.grid, key_mask)
        for blk in self.blocks:
            h = blk(h, c, ctx, self.grid, key_mask)
        return h
