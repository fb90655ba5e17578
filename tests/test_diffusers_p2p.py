"""Prompt-to-Prompt on stock diffusers pipelines, against processors written here from the paper."""

from __future__ import annotations

import math

import diffusers_tiny as tiny
import pytest
import torch
from test_diffusers_host import call_kw, close

from attnlab.attention import control
from attnlab.control import PromptToPrompt

SELF_MAX = 256  # the reference injects self-attention maps only at 16 x 16 and coarser


class InjectProcessor:
    """Legacy attention through `get_attention_scores`; the edit row's map is the source row's
    (cross-attention: every column, P2P's replace; self-attention: in layers with at most
    SELF_MAX query tokens)."""

    def __init__(self, cross: bool):
        self.cross = cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        b = hidden_states.shape[0]
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k, v = attn.head_to_batch_dim(attn.to_k(ctx)), attn.head_to_batch_dim(attn.to_v(ctx))
        p = attn.get_attention_scores(q, k, None).view(b, attn.heads, q.shape[1], k.shape[1])
        if self.cross or hidden_states.shape[1] <= SELF_MAX:
            p = torch.cat([p[:1], p[:1].expand(b - 1, -1, -1, -1)])
        out = attn.batch_to_head_dim(torch.bmm(p.reshape(b * attn.heads, *p.shape[2:]), v))
        return attn.to_out[1](attn.to_out[0](out))


def tokens_of(tok, prompt: str) -> list[str]:
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length).input_ids
    return tok.convert_ids_to_tokens(ids)


def word_index(tok, prompts):
    def find(r: int, word: str) -> list[int]:
        toks = tokens_of(tok, prompts[r])
        return [i for i, t in enumerate(toks) if t.replace("</w>", "") == word]

    return find


def test_sd_replace_equals_injection_written_from_the_paper():
    pipe = tiny.sd()
    unet = pipe.unet
    prompts = ["a red car", "a blue car"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ehs = pipe.text_encoder(ids)[0]
        x = tiny.latents(pipe, 1, 64).expand(2, -1, -1, -1).contiguous()
        kw = dict(sample=x, timestep=torch.tensor(500), encoder_hidden_states=ehs, return_dict=False)
        bare = unet(**kw)[0]
        saved = unet.attn_processors
        unet.set_attn_processor({n: InjectProcessor(".attn2." in n) for n in saved})
        try:
            want = unet(**kw)[0]
        finally:
            unet.set_attn_processor(saved)
        p2p = PromptToPrompt(mode="replace").bind(
            [tokens_of(pipe.tokenizer, p) for p in prompts], word_index(pipe.tokenizer, prompts)
        )
        with control(unet, [p2p], cfg=False):
            got = unet(**kw)[0]
    close(want, got, effect=(want - bare).abs().max().item())
    assert torch.equal(got[0], bare[0]) or (got[0] - bare[0]).abs().max() <= 1e-5 * bare.abs().max()


class JointInjectProcessor:
    """SD3's joint attention written from the P2P definition for a joint map: in the edit row,
    the image-to-text block is the source's distribution over the text at the edit row's own text
    mass, and the image-to-image block the source's at its own image mass; text rows untouched."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        def heads(t):
            return t.view(t.shape[0], -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        n = hidden_states.shape[1]
        e = encoder_hidden_states
        q = torch.cat([heads(attn.to_q(hidden_states)), heads(attn.add_q_proj(e))], 2)
        k = torch.cat([heads(attn.to_k(hidden_states)), heads(attn.add_k_proj(e))], 2)
        v = torch.cat([heads(attn.to_v(hidden_states)), heads(attn.add_v_proj(e))], 2)
        p = ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1)
        p = p.clone()
        for cols in (slice(n, None), slice(0, n)):
            block = p[:, :, :n, cols]
            mass = block.sum(-1, keepdim=True)
            p[1:, :, :n, cols] = (block[:1] / mass[:1]) * mass[1:]
        h = (p @ v).transpose(1, 2).flatten(2)
        img, txt = h[:, :n], h[:, n:]
        txt = txt if attn.context_pre_only else attn.to_add_out(txt)
        return attn.to_out[1](attn.to_out[0](img)), txt


def test_sd3_joint_replace_equals_injection_written_from_the_paper():
    pipe = tiny.sd3()
    tr = pipe.transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g).expand(2, -1, -1, -1).contiguous()
    ehs = torch.randn(2, 6, 32, generator=g)
    kw = dict(
        hidden_states=x, encoder_hidden_states=ehs, pooled_projections=torch.randn(2, 64, generator=g),
        timestep=torch.full((2,), 500.0), return_dict=False,
    )  # fmt: skip
    layer = "transformer_blocks.0.attn"
    with torch.no_grad():
        bare = tr(**kw)[0]
        module = tr.get_submodule(layer)
        saved = module.processor
        module.processor = JointInjectProcessor()
        try:
            want = tr(**kw)[0]
        finally:
            module.processor = saved
        toks = [[f"t{i}" for i in range(6)]] * 2
        p2p = PromptToPrompt(mode="replace", self_max_tokens=None, layers=layer).bind(toks, lambda r, w: [])
        with control(tr, [p2p], cfg=False):
            got = tr(**kw)[0]
    close(want, got, effect=(want - bare).abs().max().item())


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_pipeline_edit_keeps_the_source_row_and_changes_the_edit(family):
    pipe = tiny.sd() if family == "sd" else tiny.sd3()
    size = 64 if family == "sd" else 32
    prompts = ["a red car", "a blue car"]
    kw = call_kw(pipe, size, steps=4)
    lat = kw["latents"][:1].expand(2, -1, -1, -1).contiguous()
    kw = dict(kw, prompt=prompts, latents=lat)
    plain = pipe(**kw).images
    tok = pipe.tokenizer
    toks = [tokens_of(tok, p) for p in prompts]
    if family == "sd3":  # its text is CLIP's 77 tokens, then T5's
        toks = [t + [f"t5_{i}" for i in range(16)] for t in toks]
    p2p = PromptToPrompt(mode="replace").bind(toks, word_index(tok, prompts))
    with control(pipe, [p2p]):
        edited = pipe(**kw).images
    scale = plain.abs().max()
    close(plain[:1], edited[:1])  # the source row is sampled as it would be alone
    assert (edited[1] - plain[1]).abs().max() > 10 * 1e-5 * scale


def test_local_blend_keeps_the_source_outside_the_region():
    pipe = tiny.sd()
    prompts = ["a red car", "a blue car"]
    kw = call_kw(pipe, 64, steps=4)
    lat = kw["latents"][:1].expand(2, -1, -1, -1).contiguous()
    kw = dict(kw, prompt=prompts, latents=lat)
    tok = pipe.tokenizer
    p2p = PromptToPrompt(mode="replace", blend=("car",), blend_threshold=0.9, blend_scale=1.0)
    p2p.bind([tokens_of(tok, p) for p in prompts], word_index(tok, prompts))
    with control(pipe, [p2p]):
        out = pipe(**kw).images
    mask = p2p.blend_mask(tuple(out.shape[2:]))
    region = torch.maximum(mask[:1], mask[1:])[0, 0]  # (h, w)
    assert 0 < region.mean() < 1
    outside = (out[1] - out[0]).abs()[:, region == 0]
    assert outside.max() <= 1e-5 * out.abs().max()  # blended after the last step too
    assert (out[1] - out[0]).abs()[:, region == 1].max() > 1e-3


def _inject_all(den, kw, toks, **p2p_kw):
    """(bare, written, attnlab) outputs of one denoiser call on [source; edit] rows."""
    with torch.no_grad():
        bare = den(**kw)[0]
        saved = den.attn_processors
        den.set_attn_processor({n: InjectProcessor(".attn2." in n) for n in saved})
        try:
            want = den(**kw)[0]
        finally:
            den.set_attn_processor(saved)
        p2p = PromptToPrompt(mode="replace", **p2p_kw).bind(toks, lambda r, w: [])
        with control(den, [p2p], cfg=False):
            got = den(**kw)[0]
    return bare, want, got


def test_sdxl_replace_equals_injection_written_from_the_paper():
    pipe = tiny.sdxl()
    g = torch.Generator().manual_seed(0)
    kw = dict(
        sample=torch.randn(1, 4, 32, 32, generator=g).expand(2, -1, -1, -1).contiguous(),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(2, 7, 64, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(2, 32, generator=g),
            "time_ids": torch.rand(2, 6, generator=g),
        },
        return_dict=False,
    )
    bare, want, got = _inject_all(pipe.unet, kw, [[f"t{i}" for i in range(7)]] * 2)
    close(want, got, effect=(want - bare).abs().max().item())


def test_pixart_replace_equals_injection_written_from_the_paper():
    pipe = tiny.pixart()
    g = torch.Generator().manual_seed(0)
    kw = dict(
        hidden_states=torch.randn(1, 4, 8, 8, generator=g).expand(2, -1, -1, -1).contiguous(),
        encoder_hidden_states=torch.randn(2, 7, 32, generator=g),
        timestep=torch.full((2,), 500),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )
    bare, want, got = _inject_all(pipe.transformer, kw, [[f"t{i}" for i in range(7)]] * 2)
    close(want, got, effect=(want - bare).abs().max().item())


class FluxInjectProcessor:
    """Flux's joint attention ([text; image], q/k norms, then RoPE) written from the P2P definition
    for a joint map, as `JointInjectProcessor`; single-stream blocks get the joint sequence whole."""

    def __init__(self, n_txt: int):
        self.n_txt = n_txt

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(t):
            return t.unflatten(-1, (attn.heads, -1))

        q, k, v = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )
        q, k = attn.norm_q(q), attn.norm_k(k)
        e = encoder_hidden_states
        if e is not None:
            eq, ek, ev = heads(attn.add_q_proj(e)), heads(attn.add_k_proj(e)), heads(attn.add_v_proj(e))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1).transpose(1, 2)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1).transpose(1, 2)
        v = v.transpose(1, 2)
        t = self.n_txt
        p = ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1).clone()
        for cols in (slice(0, t), slice(t, None)):
            block = p[:, :, t:, cols]
            mass = block.sum(-1, keepdim=True)
            p[1:, :, t:, cols] = (block[:1] / mass[:1]) * mass[1:]
        h = (p @ v).transpose(1, 2).flatten(2)
        if e is None:
            return h
        return attn.to_out[1](attn.to_out[0](h[:, t:])), attn.to_add_out(h[:, :t])


@pytest.mark.parametrize("layer", ["transformer_blocks.0.attn", "single_transformer_blocks.1.attn"])
def test_flux_joint_replace_equals_injection_written_from_the_paper(layer):
    from test_diffusers_host import flux_inputs

    pipe = tiny.flux()
    tr = pipe.transformer
    kw = flux_inputs(pipe)
    for key in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        kw[key] = kw[key][:1].expand(2, *kw[key].shape[1:]).contiguous()
    kw["encoder_hidden_states"] = (
        kw["encoder_hidden_states"] + torch.randn_like(kw["encoder_hidden_states"]) * 0.5
    )
    n_txt = kw["encoder_hidden_states"].shape[1]
    with torch.no_grad():
        bare = tr(**kw)[0]
        module = tr.get_submodule(layer)
        saved = module.processor
        module.processor = FluxInjectProcessor(n_txt)
        try:
            want = tr(**kw)[0]
        finally:
            module.processor = saved
        p2p = PromptToPrompt(mode="replace", self_max_tokens=None, layers=layer.rsplit(".", 1)[0])
        p2p.bind([[f"t{i}" for i in range(n_txt)]] * 2, lambda r, w: [])
        with control(tr, [p2p], cfg=False):
            got = tr(**kw)[0]
    close(want, got, effect=(want - bare).abs().max().item())
