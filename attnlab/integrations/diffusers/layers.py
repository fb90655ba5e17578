"""diffusers attention modules as bus layers: the same computation as their default processors,
taken apart where controls hook in.

Two adapters:
- `HostedAttention` for the legacy `Attention` of U-Nets (SD 1.x/2.x, SDXL) and PixArt: `attn1`
  (self) and `attn2` (cross), the steps of `AttnProcessor2_0` (spatial and group norm, the mask
  diffusers prepares, q/k norms, `to_out`, the residual and rescale).
- `JointAttention` for joint image + text attention: SD3's `JointAttnProcessor2_0` ([image; text],
  q/k norms and added projections) and Flux's `FluxAttnProcessor` ([text; image], q/k norms,
  then RoPE; single-stream blocks get the joint sequence whole). Controls see the image tokens as
  the layer's input and the joint sequence in the probabilities (`AttnCall.text` and `.image`
  say which rows and columns are which); the output they see packs the image and text outputs
  in the model's order.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.attention.core import ControlChain, merge_heads
from attnlab.precision import low_precision


def adapt(name: str, module: nn.Module) -> HostedAttention | None:
    """The bus adapter of one diffusers module, or None when it is not an attention module."""
    from diffusers.models.attention_processor import Attention as LegacyAttention

    flux = _flux_attention()
    if flux is not None and isinstance(module, flux):
        return JointAttention(name, module, "flux")
    if not isinstance(module, LegacyAttention) or not hasattr(module, "processor"):
        return None
    if getattr(module, "added_kv_proj_dim", None) is not None and _is_joint_processor(module.processor):
        return JointAttention(name, module, "sd3")
    if type(module.processor).__name__.startswith("JointAttnProcessor"):
        return JointAttention(name, module, "sd3")  # SD3.5's attn2: image tokens only, self
    return HostedAttention(name, module)


def _flux_attention():
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttention
    except ImportError:  # an older diffusers
        return None
    return FluxAttention


def _is_joint_processor(proc) -> bool:
    return "Joint" in type(proc).__name__


def _accepted(fn) -> set[str] | None:
    """The keyword names `fn` takes (None: any, it has **kwargs)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


class BusProcessor:
    """Set on a selected diffusers attention module for a control scope: runs the bus adapter when
    an installed control is active on the call, else the module's own processor untouched."""

    def __init__(self, layer: HostedAttention, original):
        self.layer, self.original = layer, original
        self._takes = _accepted(original.__call__)

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        image_rotary_emb=None,
        **kwargs,
    ):
        layer = self.layer
        groups = layer.host.groups if layer.host is not None else None
        if groups is not None and len(groups) > 1:
            return self._per_group(
                groups,
                attn,
                hidden_states,
                encoder_hidden_states,
                attention_mask,
                temb,
                image_rotary_emb,
                kwargs,
            )
        return self._one(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, image_rotary_emb, kwargs
        )

    def _per_group(
        self, groups, attn, hidden_states, encoder_hidden_states, attention_mask, temb, rope, kwargs
    ):
        """A batch that holds the main pass and a guidance's pass side by side (PAG's perturbed
        rows): each group of rows runs the chain under its own roles, as if called alone."""
        layer, st = self.layer, self.layer.state
        total = hidden_states.shape[0]
        block_input = getattr(layer, "block_input", None)
        outs, start, saved = [], 0, st.roles
        try:
            for roles, n in groups:
                rows = slice(start, start + n)
                start += n

                def cut(v, rows=rows):
                    return v[rows] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == total else v

                st.roles = roles
                if block_input is not None:
                    layer.block_input = cut(block_input)
                outs.append(
                    self._one(attn, cut(hidden_states), cut(encoder_hidden_states), cut(attention_mask), cut(temb), rope,
                              {k: cut(v) for k, v in kwargs.items()})
                )  # fmt: skip
        finally:
            st.roles = saved
            if block_input is not None:
                layer.block_input = block_input
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outs))
        return torch.cat(outs)

    def _one(
        self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, image_rotary_emb, kwargs
    ):
        layer = self.layer
        if layer.any_active(hidden_states):
            return layer.run(hidden_states, encoder_hidden_states, attention_mask, temb, image_rotary_emb)
        extra = {"temb": temb, "image_rotary_emb": image_rotary_emb, **kwargs}
        extra = {k: v for k, v in extra.items() if (v is not None or k in kwargs)}
        if self._takes is not None:
            extra = {k: v for k, v in extra.items() if k in self._takes}
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)

    def __getattr__(self, name):  # diffusers reads attributes of processors (e.g. backends)
        if name in ("layer", "original", "_takes"):
            raise AttributeError(name)
        return getattr(self.original, name)


class FluxBusProcessor(BusProcessor):
    """`BusProcessor` for Flux's attention, which passes the rotary embedding fifth, positionally."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
        **kwargs,
    ):
        return super().__call__(
            attn,
            hidden_states,
            encoder_hidden_states,
            attention_mask,
            image_rotary_emb=image_rotary_emb,
            **kwargs,
        )


def processor_for(layer: HostedAttention, original) -> BusProcessor:
    """The bus processor that takes the module's calls as its own processor does."""
    if getattr(layer, "family", None) == "flux":
        return FluxBusProcessor(layer, original)
    return BusProcessor(layer, original)


class HostedAttention(ControlChain):
    """A legacy diffusers `Attention` (self or cross) seen by the bus.

    Attributes:
        name: its module path in the denoiser.
        module: the diffusers module (its weights are used, never copied).
    """

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self.kind = "cross" if getattr(module, "is_cross_attention", False) else "self"
        self.heads = module.heads
        self.controls: list = []
        self.state = None
        self.host = None
        self.training = False
        self.dim = module.inner_dim if hasattr(module, "inner_dim") else module.to_q.out_features

    def any_active(self, hidden_states: Tensor) -> bool:
        """Whether some installed control acts on this call (cheap: no tensor work)."""
        if not self.controls:
            return False
        probe = self._call_info(hidden_states, (0,))
        return any(c.active(probe) for c in self.controls)

    # The steps of AttnProcessor2_0

    def run(self, hidden_states, encoder_hidden_states, attention_mask, temb, image_rotary_emb):
        attn = self.module
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
            grid = (h, w)
        else:
            grid = self.host.grid_for(hidden_states.shape[1]) if self.host else (hidden_states.shape[1],)
        b = hidden_states.shape[0]
        src_len = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
        mask = attention_mask
        if mask is not None:
            mask = attn.prepare_attention_mask(mask, src_len, b)
            mask = mask.view(b, attn.heads, -1, mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = encoder_hidden_states
        if context is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        out = self._forward_controlled(hidden_states, context, mask, grid, self._pre_norm(hidden_states))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _pre_norm(self, x: Tensor) -> Tensor | None:
        pre = getattr(self, "block_input", None)
        return pre if pre is not None and pre.shape == x.shape else None

    def project(self, x: Tensor, context: Tensor | None, grid=None):
        attn = self.module
        src = x if context is None else context
        q, k, v = attn.to_q(x), attn.to_k(src), attn.to_v(src)
        d = k.shape[-1] // attn.heads
        q, k, v = (t.view(t.shape[0], -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        return q, k, v

    def _fused(self, q, k, v, grid, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)

    def _probs(self, q, k, mask, grid):
        return probabilities(q, k, mask)

    def to_out(self, h: Tensor) -> Tensor:
        return self.module.to_out[1](self.module.to_out[0](h))

    def perturbed(self, call, x: Tensor) -> Tensor:
        """Self-attention with the identity map (PAG): to_out(V), as `PAGIdentitySelfAttnProcessor2_0`."""
        return self.to_out(self.module.to_v(x))


def probabilities(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) (B, heads, N, L), in fp32 for bf16 / fp16 inputs; `mask` is
    SDPA's: additive float, or boolean (True = attend)."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if low_precision(scores):
        scores = scores.float()
    if mask is not None:
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(scores)
        )
    return scores.softmax(dim=-1)


class JointAttention(HostedAttention):
    """A joint image + text attention module (SD3, Flux) seen by the bus; kind "joint" (or "self"
    on a call without text, as SD3.5's second attention)."""

    def __init__(self, name: str, module: nn.Module, family: str):
        super().__init__(name, module)
        self.family = family
        self.single = family == "flux" and getattr(module, "added_kv_proj_dim", None) is None
        self.kind = (
            "joint" if (getattr(module, "added_kv_proj_dim", None) is not None or self.single) else "self"
        )
        self.heads = module.heads
        self._rope = self._context = self._ctx_len = None

    def text_first(self) -> bool:
        return self.family == "flux"

    def layout(self, n_img: int, n_txt: int) -> tuple[slice, slice]:
        """(image, text) positions in the joint sequence."""
        if self.text_first():
            return slice(n_txt, n_txt + n_img), slice(0, n_txt)
        return slice(0, n_img), slice(n_img, n_img + n_txt)

    def run(self, hidden_states, encoder_hidden_states, attention_mask, temb, image_rotary_emb):
        self._rope = image_rotary_emb
        if self.single:  # Flux single-stream: [text; image] arrives whole
            n_txt = self.host.text_len if self.host is not None else 0
            context, x = hidden_states[:, :n_txt], hidden_states[:, n_txt:]
        else:
            context, x = encoder_hidden_states, hidden_states
        grid = self.host.grid_for(x.shape[1]) if self.host else (x.shape[1],)
        extra = {}
        if context is not None:
            extra["image"], extra["text"] = self.layout(x.shape[1], context.shape[1])
        out = self._forward_controlled(x, context, attention_mask, grid, self._pre_norm(x), **extra)
        if self.single:
            return out
        if context is None:
            return out
        img, txt = self.layout(out.shape[1] - context.shape[1], context.shape[1])
        return out[:, img], out[:, txt]

    def project(self, x: Tensor, context: Tensor | None, grid=None):
        attn = self.module
        if self.family == "sd3":
            q, k, v = (self._heads(p(x)) for p in (attn.to_q, attn.to_k, attn.to_v))
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            if context is None:
                return q, k, v
            cq, ck, cv = (
                self._heads(p(context)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            return torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        return self._project_flux(x, context)

    def _heads(self, t: Tensor) -> Tensor:
        d = t.shape[-1] // self.module.heads
        return t.view(t.shape[0], -1, self.module.heads, d).transpose(1, 2)

    def _project_flux(self, x: Tensor, context: Tensor | None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        attn = self.module
        seq = x if context is None or not self.single else torch.cat([context, x], 1)
        q, k, v, cq, ck, cv = _get_qkv_projections(attn, seq, None if self.single else context)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))  # (B, N, heads, d)
        q, k = attn.norm_q(q), attn.norm_k(k)
        if not self.single and context is not None:
            cq, ck, cv = (t.unflatten(-1, (-1, attn.head_dim)) for t in (cq, ck, cv))
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        if self._rope is not None:
            q = apply_rotary_emb(q, self._rope, sequence_dim=1)
            k = apply_rotary_emb(k, self._rope, sequence_dim=1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, N, d)

    def to_out(self, h: Tensor) -> Tensor:
        """The joint output (B, N_all, C) with each part through its own projection, in the
        model's order (Flux single-stream blocks have none: the attention output as it is)."""
        attn = self.module
        if self.single:
            return h
        call_text = self._ctx_len  # the text tokens of the call in progress
        if call_text is None:
            return attn.to_out[1](attn.to_out[0](h))
        img, txt = self.layout(h.shape[1] - call_text, call_text)
        hi = attn.to_out[1](attn.to_out[0](h[:, img].contiguous()))
        ht = h[:, txt]
        if not getattr(attn, "context_pre_only", False) and getattr(attn, "to_add_out", None) is not None:
            ht = attn.to_add_out(ht.contiguous())
        return torch.cat([ht, hi], 1) if self.text_first() else torch.cat([hi, ht], 1)

    def _forward_controlled(self, x, context, mask, grid, pre_norm=None, **extra):
        self._ctx_len = None if context is None else context.shape[1]
        self._context = context
        try:
            return super()._forward_controlled(x, context, mask, grid, pre_norm, **extra)
        finally:
            self._context = None

    def perturbed(self, call, x: Tensor) -> Tensor:
        """PAG's perturbed joint attention, as `PAGJointAttnProcessor2_0`: the image-to-image block
        of the map is the identity, image-to-text and the text rows are left as they are. Unlike
        that processor, the model's q/k norms (and RoPE) are applied, as the model does."""
        context = call.scratch.get("context")
        if context is None or call.text is None:
            return self.to_out(self.module.to_v(x)) if not self.single else x
        q, k, v = self.project(x, context)
        n = q.shape[2]
        bias = torch.zeros(n, n, dtype=q.dtype, device=q.device)
        img = call.image
        block = torch.full((img.stop - img.start,) * 2, float("-inf"), dtype=q.dtype, device=q.device)
        block.fill_diagonal_(0)
        bias[img, img] = block
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None, None])
        return self.to_out(merge_heads(h))

    def _call_info(self, x, grid, pre_norm=None, **extra):
        call = super()._call_info(x, grid, pre_norm, **extra)
        call.scratch["context"] = getattr(self, "_context", None)
        return call
