"""The token backbone: a bidirectional transformer over token embeddings (the MDLM / LLaDA denoiser,
Sahoo et al. 2024, arXiv:2406.07524; built as DiT is, Peebles & Xie 2023) from attnlab's
`TransformerBlock` and its one `Attention`. Its output is a logit per vocabulary entry at each
position, for masked diffusion (`attnlab.diffusion.masked`).

The condition is a sequence of condition token ids (`Condition.tokens` (B, Lc) long, `mask` (B,
Lc)), embedded with their slot positions, and read by cross-attention, or joined to the sequence
(in-context) and read by self-attention. The timestep t in [0, 1] enters by adaLN-Zero, is added
to the tokens, joins them as one token, or does not enter at all (MDLM: masked diffusion needs no
time input). Every choice beyond that is a technique of the model plan (positions, kernels, skips).

Attention layers are named "blocks.{i}.self" and "blocks.{i}.cross", as in the DiT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.attention import attention_layers, name_layers
from attnlab.conditioning import Condition
from attnlab.models.blocks import Context, TransformerBlock, zero_
from attnlab.models.config import ModelConfig
from attnlab.models.dit import FinalLayer
from attnlab.models.embeddings import TimestepEmbedding, batch_timesteps, sincos_1d
from attnlab.models.plan import ModelPlan, resolve
from attnlab.precision import autocast

TIME_SCALE = 1000.0  # t in [0, 1] onto the sinusoid embedding's 0..1000 range


class ConditionTokens(nn.Module):
    """Condition ids (B, Lc) -> (B, Lc, dim) embeddings with fixed sin-cos slot positions; a row of
    the null condition (`Condition.null_like`: one token 0) is one learned null token."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(vocab, dim)
        self.dim = dim

    def forward(self, cond: Condition | None, batch: int) -> tuple[Tensor, Tensor]:
        ids, mask = (None, None) if cond is None else (cond.tokens, cond.mask)
        if ids is None:  # the null condition
            ids = torch.zeros(batch, 1, dtype=torch.long, device=self.table.weight.device)
            mask = torch.ones(batch, 1, dtype=torch.bool, device=ids.device)
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        pos = sincos_1d(torch.arange(ids.shape[1], device=ids.device), self.dim).to(self.table.weight)
        return self.table(ids.long()) + pos[None], mask  # (B, Lc, dim), (B, Lc)


class TokenTransformer(nn.Module):
    """A bidirectional transformer denoiser over token ids.

    Args:
        cfg: the model config (backbone="tokens"): size = sequence length, in_channels = vocabulary
            size, width, depth, heads; cond "text" with context_dim = condition vocabulary size.
        plan: its techniques resolved (`attnlab.models.plan.resolve(cfg)`, the default).
    """

    def __init__(self, cfg: ModelConfig, plan: ModelPlan | None = None):
        super().__init__()
        self.config, d = cfg, cfg.width
        self.grid = (cfg.size,)
        plan = plan if plan is not None else resolve(cfg)
        self.embed_tokens = nn.Embedding(cfg.in_channels, d)
        self.set_positions(plan.dit_positions(self.grid, d))
        self.time_input = plan.time_input(d)  # the time in the tokens, None (adaLN-Zero), or no time
        self.reads_time = self.time_input is None or self.time_input.reads_time
        self.time_embed = TimestepEmbedding(256, d) if self.reads_time else None
        self.cond_embed = ConditionTokens(cfg.context_dim, d) if cfg.cond == "text" else None
        self.blocks = nn.ModuleList(TransformerBlock(d, s, d, d) for s in plan.dit_block_specs())
        self.in_context = plan.condition_tokens()  # the condition joins the tokens, or None
        self.long_skips = plan.run_blocks(cfg.depth, d)
        self.final = FinalLayer(d, cfg.in_channels, modulated=self.time_input is None)
        self.init_weights()
        state = name_layers(self)
        state.grids = {name: self.grid for name in attention_layers(self)}  # every layer's queries

    def set_positions(self, pos: Tensor | None) -> None:
        """`pos`: the (1, L, dim) table added to the token embeddings (fixed sin-cos by default, a
        parameter when learned, None with rotary positions)."""
        if isinstance(pos, nn.Parameter):
            self.pos = pos
        else:
            self.register_buffer("pos", pos, persistent=False)

    def init_weights(self) -> None:
        """DiT's initialisation (xavier linears, N(0, 0.02) embeddings, zero adaLN regressions and
        output layer): every block starts as the identity and the logits start uniform."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for table in (self.embed_tokens, *([self.cond_embed.table] if self.cond_embed else [])):
            nn.init.normal_(table.weight, std=0.02)
        if self.time_embed is not None:
            for m in self.time_embed.mlp[0], self.time_embed.mlp[2]:
                nn.init.normal_(m.weight, std=0.02)
        for blk in self.blocks:
            blk.zero_init()
        if self.final.ada is not None:
            zero_(self.final.ada)
        zero_(self.final.linear)

    precision = "fp32"  # how forward computes (attnlab.precision.set_precision); weights stay fp32

    def forward(self, z: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        """Args:
            z: (B, L) token ids (the mask token where masked).
            t: (B,) times in [0, 1], or one shared by the batch.
            cond: condition token ids and mask; None or missing tokens mean the null condition.
        Returns:
            (B, L, V) logits in fp32.
        """
        with autocast(self.precision, z.device):
            return self._forward(z, t, cond).float()

    def _forward(self, z: Tensor, t: Tensor, cond: Condition | None) -> Tensor:
        b, n = z.shape
        c = None
        if self.time_embed is not None:
            c = F.silu(self.time_embed(TIME_SCALE * batch_timesteps(t, b, z.device)))  # (B, width)
        ctx: Context = self.cond_embed(cond, b) if self.cond_embed is not None else None
        h = self.embed_tokens(z)  # (B, L, width)
        h = h if self.pos is None else h + self.pos
        key_mask = None
        if self.time_input is not None:
            h = self.time_input(h, c)  # (B, L or L + 1, width)
        if self.in_context is not None and ctx is not None:
            w = ctx[1].unsqueeze(-1).to(ctx[0].dtype)  # (B, Lc, 1): padding pools nothing
            vec = (ctx[0] * w).sum(1) / w.sum(1).clamp(min=1)  # the pooled token leads (DiT in-context)
            (h, key_mask), ctx = self.in_context.join(h, self.in_context.condition_tokens(vec, *ctx)), None
        h = self.run_blocks(h, c, ctx, key_mask)[:, :n]  # condition / time tokens dropped
        return self.final(h, c)

    def run_blocks(self, h: Tensor, c: Tensor | None, ctx: Context, key_mask: Tensor | None) -> Tensor:
        if self.long_skips is not None:
            return self.long_skips(self.blocks, h, c, ctx, self.grid, key_mask)
        for blk in self.blocks:
            h = blk(h, c, ctx, self.grid, key_mask)
        return h
