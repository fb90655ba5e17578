"""The one Attention module (self or cross, multi-head) that every attnlab backbone is built from.

The module computes q, k, v and hands them to a kernel: the fused SDPA kernel by default, or the
explicit softmax path when an installed control needs the probabilities. Controls (see
`attnlab.attention.bus`) see each call as an `AttnCall` and may change the input tokens, the
probabilities or the output. With no control installed, `forward` costs one list check on top of
the bare computation. A layer built with a `kernel` (linear or windowed attention, say) runs it
instead of softmax over all tokens; the kernel also supplies explicit probabilities, so controls
work on such a layer unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.precision import low_precision

if TYPE_CHECKING:
    from attnlab.attention.bus import BusState, Control


@dataclass
class AttnCall:
    """What a control sees of one attention call.

    Attributes:
        name: the layer's stable name (its dotted module path, same in every model built from one config).
        kind: "self", "cross" (to condition tokens), "xscale" (to features of another resolution)
            or "joint" (image and text tokens in one softmax, diffusers' SD3 and Flux).
        grid: token grid shape of the query sequence, e.g. (16, 16) for a 2D map or (256,) for 1D.
        heads: number of heads.
        step: sampling step index (0-based) or None outside a sampling loop.
        num_steps: total sampling steps or None.
        timestep: the diffusion timestep tensor of the current model call, or None.
        roles: names of the equal chunks the batch is made of, in order (e.g. ("uncond", "cond")).
        layer: the Attention module itself (for caches keyed by layer).
        scratch: free storage that lives for this one call (controls pass notes to later hooks).
        pre_norm: (B, N, dim) the tokens before the sub-layer's norm (the block's residual stream),
            when the block passes them; token merging measures similarity on them, as tomesd does.
        batch: number of rows in the call's batch.
        text: on a joint (image + text) attention layer (SD3, Flux), where the text tokens sit in
            its joint sequence, which the probabilities' rows and columns index; the image queries
            are at `image`. None on every other layer.
        chunk_seeds: the seeds of the samples one chunk's rows belong to (`BusState.chunk_seeds`);
            read them per row as `seeds`.
        point_weights: on the points backbone, how each point of the current input reads the query
            tokens (`BusState.point_weights`): indices (B, N, k) into the grid and weights (B, N, k)
            summing to 1 per point; None on every other backbone.
    """

    name: str
    kind: Literal["self", "cross", "xscale", "joint"]
    grid: tuple[int, ...]
    heads: int
    step: int | None
    num_steps: int | None
    timestep: Tensor | None
    roles: tuple[str, ...]
    layer: ControlChain
    scratch: dict[str, Any] = field(default_factory=dict)
    pre_norm: Tensor | None = None
    batch: int = 0
    chunk_seeds: tuple[int, ...] | None = None
    text: slice | None = None
    image: slice | None = None
    point_weights: tuple[Tensor, Tensor] | None = None

    def chunk(self, t: Tensor, role: str) -> slice:
        """Batch rows of `t` that belong to `role` (the batch is `len(roles)` equal chunks)."""
        n = t.shape[0] // len(self.roles)
        i = self.roles.index(role)
        return slice(i * n, (i + 1) * n)

    @property
    def seeds(self) -> tuple[int, ...] | None:
        """One seed per batch row: its sample's seed, the same in every chunk (uncond, cond, a
        guidance pass), so a control can draw a row's random numbers independently of its batch.
        None when the sampling run has no per-sample seeds (or outside one).

        Raises:
            ValueError: the batch is not one row per sample per chunk; a pass over some samples
                only must say which (`attnlab.attention.sample_rows`).
        """
        if self.chunk_seeds is None:
            return None
        per_row = self.chunk_seeds * len(self.roles)
        if len(per_row) != self.batch:
            raise ValueError(
                f"layer {self.name or '?'}: a batch of {self.batch} rows in {len(self.roles)} chunk(s) "
                f"{self.roles} does not match the {len(self.chunk_seeds)} sample seed(s) the bus "
                "holds; run a pass over some samples inside `sample_rows(model, rows)`"
            )
        return per_row


def split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # (B, heads, N, d)


def merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, N, heads * d)


def key_padding_bias(mask: Tensor | None) -> Tensor | None:
    """(B, L) bool mask, True = real token, as an SDPA boolean mask of shape (B, 1, 1, L)."""
    return None if mask is None else mask[:, None, None, :]


def attention_probs(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """Explicit softmax(q k^T / sqrt(d)) with padding keys excluded; (B, heads, N, L). The softmax
    is computed and returned in fp32 when q and k are bf16 / fp16, so controls that read or edit
    probabilities (heat maps, prompt-to-prompt) see exact ones."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, heads, N, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.float() if low_precision(scores) else scores).softmax(dim=-1)


# Scores of at most this many elements per chunk, and in all, take the explicit path on a CPU.
CHUNK_SCORES = 1 << 22
MAX_SCORES = 1 << 26


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, N, d) with an SDPA boolean mask (True = attend).

    `F.scaled_dot_product_attention` everywhere, except in bf16 / fp16 on a CPU, where PyTorch's
    flash kernel is slower than the explicit path at attnlab's sizes (head widths 8-64, up to ~1000
    tokens; 1.7-8x in fwd + bwd, `benchmarks/train_throughput.py --kernels`). There the scores are
    formed explicitly, a few batch rows at a time so each chunk's scores stay in cache, as long as
    all of them fit in MAX_SCORES elements; beyond that the flash kernel's memory saving wins.
    """
    b, h, n, _ = q.shape
    per_row = h * n * k.shape[-2]
    if q.device.type != "cpu" or not low_precision(q) or b * per_row > MAX_SCORES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q = q * (1.0 / math.sqrt(q.shape[-1]))  # scale the small tensor, not the scores
    rows = max(1, CHUNK_SCORES // per_row)
    outs = []
    for i in range(0, b, rows):
        s = q[i : i + rows] @ k[i : i + rows].transpose(-2, -1)
        if mask is not None:
            s = s.masked_fill(~mask[i : i + rows] if mask.shape[0] == b else ~mask, float("-inf"))
        outs.append(s.softmax(dim=-1) @ v[i : i + rows])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class AttnKernel(Protocol):
    """How a self-attention layer mixes tokens when it is not softmax over all of them.

    Both methods see q, k, v as (B, heads, N, d) on the token grid `grid`, and `key_mask` (B, N)
    bool (True = real token) or None, and must agree:
    `attend(q, k, v, grid, key_mask) == probs(q, k, grid, key_mask) @ v` up to float error.
    """

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, ...], key_mask: Tensor | None
    ) -> Tensor:
        """The efficient path; returns (B, heads, N, d)."""

    def probs(self, q: Tensor, k: Tensor, grid: tuple[int, ...], key_mask: Tensor | None) -> Tensor:
        """The explicit attention matrix (B, heads, N, N), rows summing to 1, for controls."""


class ControlChain:
    """The control chain of one attention layer: how installed controls see and change a call.

    A layer (attnlab's `Attention`, or a diffusers attention module adapted by
    `attnlab.integrations.diffusers`) provides `name`, `kind`, `heads`, `controls`, `state` and
    `project(x, context, grid) -> q, k, v` (B, heads, N, d), `_probs(q, k, mask, grid)`,
    `_fused(q, k, v, grid, mask)` and `to_out(h)`; the mask is whatever the layer's own kernel
    takes. `_forward_controlled` runs one call through the active controls.
    """

    name: str
    kind: str
    heads: int
    controls: list
    state: BusState | None

    def _call_info(self, x: Tensor, grid, pre_norm=None, **extra) -> AttnCall:
        st = self.state
        return AttnCall(
            name=self.name,
            kind=self.kind,
            grid=tuple(grid),
            heads=self.heads,
            step=st.step if st else None,
            num_steps=st.num_steps if st else None,
            timestep=st.timestep if st else None,
            roles=st.roles if st else ("cond",),
            layer=self,
            pre_norm=pre_norm,
            batch=x.shape[0],
            chunk_seeds=st.chunk_seeds() if st else None,
            point_weights=st.point_weights if st else None,
            **extra,
        )

    def _forward_controlled(self, x, context, context_mask, grid, pre_norm=None, **extra):
        call = self._call_info(x, grid, pre_norm, **extra)
        active = [c for c in self.controls if c.active(call)]
        for c in active:
            x = c.before(call, x)
        out = None
        for c in active:
            out = c.replace(call, x)  # a cached output skips the computation entirely
            if out is not None:
                break
        if out is None:
            out = self._attend(call, active, x, context, context_mask)
        for c in reversed(active):  # outermost control sees the final output
            out = c.after(call, out)
        return out

    def _attend(self, call, active, x, context, context_mask):
        q, k, v = self.project(x, context, call.grid)
        if any(c.needs_probs(call) for c in active):
            p = self._probs(q, k, context_mask, call.grid)  # (B, heads, N, L)
            for c in active:
                p = c.probs(call, p)
            h = p.to(v.dtype) @ v
        else:
            h = self._fused(q, k, v, call.grid, context_mask)
        return self.to_out(merge_heads(h))


class Attention(ControlChain, nn.Module):
    """Multi-head self- or cross-attention with a pluggable control chain.

    Args:
        dim: width of the query tokens.
        heads: number of heads (`dim` must be divisible by it).
        context_dim: width of the context tokens; given means cross-attention.
        qkv_bias: whether the q/k/v projections have a bias.
        kernel: for self-attention, the kernel that replaces softmax over all tokens (None: SDPA).
        kind: "xscale" marks a layer whose context is features of another resolution rather than
            condition tokens, so controls that read words (heat maps, editing) leave it alone.
        rotary: a module `rotary(q, k, grid) -> (q, k)` that rotates queries and keys by their grid
            positions (RoPE, `attnlab.models.techniques.rope`); None: no relative positions.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        kernel: AttnKernel | None = None,
        kind: Literal["xscale"] | None = None,
        rotary: nn.Module | None = None,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by heads={heads}")
        if kernel is not None and context_dim is not None:
            raise ValueError("an attention kernel replaces self-attention only; this layer has context_dim")
        self.dim, self.heads, self.kernel = dim, heads, kernel
        self.kind: Literal["self", "cross", "xscale"] = kind or (
            "cross" if context_dim is not None else "self"
        )
        if self.kind == "self":
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # one matmul for q, k, v
        else:
            self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
            self.to_kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)
        self.rotary = rotary
        self.name = ""  # set by attnlab.attention.bus.name_layers once the model is built
        self.controls: list[Control] = []
        self.state: BusState | None = None

    def project(
        self, x: Tensor, context: Tensor | None, grid: tuple[int, ...] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        if self.kind == "self":
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)  # 3 x (B, N, C)
        else:
            q = self.to_q(x)
            k, v = self.to_kv(context).chunk(2, dim=-1)  # 2 x (B, L, C)
        q, k, v = split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)
        if self.rotary is not None:  # relative positions enter the scores through q and k only
            q, k = self.rotary(q, k, grid or (x.shape[1],))
        return q, k, v

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        grid: tuple[int, ...] | None = None,
        pre_norm: Tensor | None = None,
    ) -> Tensor:
        """Args:
            x: (B, N, dim) query tokens.
            context: (B, L, context_dim) condition tokens for cross-attention (ignored for self).
            context_mask: (B, L) bool, True where the key token is real (the context tokens, or for
                self-attention the input tokens, e.g. padded in-context text); padding gets no attention.
            grid: the query tokens' grid shape, reported to controls (defaults to (N,)).
            pre_norm: (B, N, dim) the tokens before the block normalised them into x, reported to
                controls (`AttnCall.pre_norm`); unused by the computation.
        Returns:
            (B, N, dim).
        """
        if self.kind != "self" and context is None:
            raise ValueError(
                f"{self.kind}-attention layer {self.name or '?'} was called without context tokens"
            )
        grid = grid or (x.shape[1],)
        if self.controls:
            return self._forward_controlled(x, context, context_mask, grid, pre_norm)
        q, k, v = self.project(x, context, grid)
        return self.to_out(merge_heads(self._fused(q, k, v, grid, context_mask)))

    def _fused(self, q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, ...], context_mask: Tensor | None):
        """The efficient path, (B, heads, N, d): the layer's kernel, or SDPA over all tokens with the
        key padding (cross- or self-attention) masked."""
        if self.kernel is not None:
            return self.kernel.attend(q, k, v, grid, context_mask)
        return sdpa(q, k, v, key_padding_bias(context_mask))

    def forward_math(
        self,
        x: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        grid: tuple[int, ...] | None = None,
    ):
        """The explicit path; returns (output, probabilities). Equals `forward` up to float error."""
        q, k, v = self.project(x, context, grid)
        p = self._probs(q, k, context_mask, grid or (x.shape[1],))
        return self.to_out(merge_heads(p.to(v.dtype) @ v)), p

    def _probs(self, q: Tensor, k: Tensor, context_mask: Tensor | None, grid: tuple[int, ...]) -> Tensor:
        if self.kernel is not None:
            return self.kernel.probs(q, k, grid, context_mask)
        return attention_probs(q, k, key_padding_bias(context_mask))
