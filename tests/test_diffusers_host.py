"""The bus on stock diffusers pipelines: PAG and heat maps against diffusers' own pipelines and
computations written here, the scope restoring everything, and bad input."""

from __future__ import annotations

import math

import diffusers_tiny as tiny
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from attnlab.attention import Control, control
from attnlab.control import PAG, AttnCache, HeatMaps
from attnlab.errors import ConfigError

PROMPTS = ["a red car", "a blue cat"]
TOL = 1e-5  # max |difference| relative to the output's scale


def close(a: torch.Tensor, b: torch.Tensor, effect: float | None = None) -> float:
    """Assert a == b within TOL of the output's scale (and, given, the effect >= 100x that)."""
    scale = max(a.abs().max().item(), 1e-12)
    diff = (a - b).abs().max().item()
    assert diff <= TOL * scale, f"max |diff| {diff:.3g} > {TOL} x scale {scale:.3g}"
    if effect is not None:
        assert effect >= 100 * TOL * scale, f"effect {effect:.3g} too small to test at scale {scale:.3g}"
    return diff


def call_kw(pipe, size: int, steps: int = 3, guidance: float = 5.0, **extra) -> dict:
    kw = dict(
        prompt=PROMPTS,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=tiny.latents(pipe, len(PROMPTS), size),
        output_type="latent",
        height=size,
        width=size,
    )
    name = type(pipe).__name__
    if name.startswith(("PixArt", "StableDiffusion3", "Flux")):
        kw["max_sequence_length"] = 16
    if name.startswith("PixArt"):
        kw["use_resolution_binning"] = False
    kw.update(extra)
    return kw


def images(pipe, kw) -> torch.Tensor:
    return pipe(**kw).images


FAMILIES = {
    "sd": (tiny.sd, 64),
    "sdxl": (tiny.sdxl, 64),
    "pixart": (tiny.pixart, 16),
    "sd3": (tiny.sd3, 32),
    "flux": (tiny.flux, 16),
}


@pytest.fixture(scope="module")
def pipes():
    return {name: build() for name, (build, _) in FAMILIES.items()}


# PAG against diffusers' PAG pipelines


@pytest.mark.parametrize(
    "family, peer, peer_layers, ours",
    [
        ("sd", "StableDiffusionPAGPipeline", ["mid"], "mid_block"),
        ("sdxl", "StableDiffusionXLPAGPipeline", ["mid"], "mid_block"),
        # diffusers' "blocks.1" is a regex that also selects blocks 10 and 11 (pinned below)
        ("pixart", "PixArtSigmaPAGPipeline", [r"blocks\.1\."], "transformer_blocks.1"),
        ("sd3", "StableDiffusion3PAGPipeline", ["blocks.1"], "transformer_blocks.1"),
    ],
)
@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_pag_equals_diffusers_pag_pipeline(pipes, family, peer, peer_layers, ours, guidance):
    import diffusers

    pipe = pipes[family]
    ref = tiny._build(getattr(diffusers, peer), dict(pipe.components, pag_applied_layers=peer_layers))
    kw = call_kw(pipe, FAMILIES[family][1], guidance=guidance)
    want = images(ref, dict(kw, pag_scale=3.0, pag_adaptive_scale=0.0))
    bare = images(pipe, kw)
    with control(pipe, [PAG(scale=3.0, layers=ours)]):
        got = images(pipe, kw)
    close(want, got, effect=(want - bare).abs().max().item())


def test_pag_adaptive_scale_equals_the_pipeline(pipes):
    from diffusers import StableDiffusionPAGPipeline

    pipe = pipes["sd"]
    ref = tiny._build(StableDiffusionPAGPipeline, dict(pipe.components, pag_applied_layers=["mid"]))
    kw = call_kw(pipe, 64)
    want = images(ref, dict(kw, pag_scale=3.0, pag_adaptive_scale=0.004))
    flat = images(ref, dict(kw, pag_scale=3.0))
    with control(pipe, [PAG(scale=3.0, adaptive_scale=0.004, layers="mid_block")]):
        got = images(pipe, kw)
    close(want, got, effect=(want - flat).abs().max().item())


def test_pixart_default_layers_differ_from_the_pipelines_regex(pipes):
    """diffusers' default `pag_applied_layers="blocks.1"` is a regex search that also perturbs
    blocks 10 and 11 of a 12-block PixArt; attnlab's whole-part "transformer_blocks.1" is block 1
    only, and the pipeline's default is reproduced by naming its three blocks."""
    from diffusers import PixArtSigmaPAGPipeline

    pipe = pipes["pixart"]
    ref = tiny._build(PixArtSigmaPAGPipeline, dict(pipe.components, pag_applied_layers=["blocks.1"]))
    kw = call_kw(pipe, 16)
    want = images(ref, dict(kw, pag_scale=3.0))
    with control(pipe, [PAG(scale=3.0)]):  # attnlab's default on a transformer: its second block
        only_one = images(pipe, kw)
    with control(pipe, [PAG(scale=3.0, layers=[f"transformer_blocks.{i}" for i in (1, 10, 11)])]):
        three = images(pipe, kw)
    close(want, three)
    assert (want - only_one).abs().max() > 100 * TOL * want.abs().max()


def test_sd35_pag_applies_the_qk_norms_the_pipeline_skips():
    """diffusers' PAG joint processors never apply norm_q / norm_k, so on a model with q/k norms
    (SD3.5) even the unperturbed rows of the PAG layers differ from the model; attnlab runs the
    model's own computation there and applies the norms in the perturbed pass too."""
    from diffusers import StableDiffusion3PAGPipeline

    pipe = tiny.sd3(qk_norm="rms_norm")
    torch.manual_seed(1)
    for m in pipe.transformer.modules():  # non-trivial norm weights, so skipping them shows
        if type(m).__name__ == "RMSNorm" and getattr(m, "weight", None) is not None:
            m.weight.data.uniform_(0.5, 2.0)
    ref = tiny._build(StableDiffusion3PAGPipeline, dict(pipe.components, pag_applied_layers=["blocks.1"]))
    kw = call_kw(pipe, 32)
    peer = images(ref, dict(kw, pag_scale=3.0))
    with control(pipe, [PAG(scale=3.0, layers="transformer_blocks.1")]):
        ours = images(pipe, kw)
    assert (peer - ours).abs().max() > 100 * TOL * ours.abs().max()
    plain = tiny.sd3()  # the same comparison without q/k norms agrees (test_pag_equals_...)
    kw = call_kw(plain, 32)
    ref = tiny._build(StableDiffusion3PAGPipeline, dict(plain.components, pag_applied_layers=["blocks.1"]))
    want = images(ref, dict(kw, pag_scale=3.0))
    with control(plain, [PAG(scale=3.0, layers="transformer_blocks.1")]):
        close(want, images(plain, kw))


class IdentityImageBlock:
    """A processor written here from PAG's definition for joint attention: the image-to-image
    block of the map is the identity; the rows and columns of the text are left alone. Flux order
    [text; image], q/k norms, then RoPE, as FluxAttnProcessor."""

    def __init__(self, original):
        self.original = original

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(t):
            return t.unflatten(-1, (attn.heads, -1))

        single = encoder_hidden_states is None
        seq = hidden_states
        q, k, v = heads(attn.to_q(seq)), heads(attn.to_k(seq)), heads(attn.to_v(seq))
        q, k = attn.norm_q(q), attn.norm_k(k)
        n_txt = self.text_len if single else encoder_hidden_states.shape[1]
        if not single:
            e = encoder_hidden_states
            eq, ek, ev = heads(attn.add_q_proj(e)), heads(attn.add_k_proj(e)), heads(attn.add_v_proj(e))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        n = q.shape[1]
        bias = torch.zeros(n, n)
        bias[n_txt:, n_txt:] = float("-inf")
        bias[range(n_txt, n), range(n_txt, n)] = 0.0
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias
        )
        out = out.transpose(1, 2).flatten(2)
        if single:
            return out
        txt, img = out[:, :n_txt], out[:, n_txt:]
        return attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(txt)


def flux_inputs(pipe, batch: int = 2):
    g = torch.Generator().manual_seed(3)
    tr = pipe.transformer
    n_img, n_txt = 16, 5
    return dict(
        hidden_states=torch.randn(batch, n_img, tr.config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, n_txt, tr.config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, tr.config.pooled_projection_dim, generator=g),
        timestep=torch.full((batch,), 0.7),
        img_ids=pipe._prepare_latent_image_ids(batch, 4, 4, "cpu", torch.float32),
        txt_ids=torch.zeros(n_txt, 3),
        return_dict=False,
    )


@pytest.mark.parametrize("layer", ["transformer_blocks.1", "single_transformer_blocks.0"])
def test_flux_pag_equals_the_cond_only_formula(pipes, layer):
    """Flux runs no CFG batch: PAG is eps_c + s (eps_c - eps_ptb), eps_ptb from a pass whose
    chosen layer's image-to-image map is the identity (processor written here)."""
    pipe = pipes["flux"]
    tr = pipe.transformer
    kw = flux_inputs(pipe)
    with torch.no_grad():
        cond = tr(**kw)[0]
        module = tr.get_submodule(layer + ".attn")
        original = module.processor
        proc = IdentityImageBlock(original)
        proc.text_len = kw["encoder_hidden_states"].shape[1]
        module.processor = proc
        try:
            ptb = tr(**kw)[0]
        finally:
            module.processor = original
        want = cond + 2.0 * (cond - ptb)
        with control(tr, [PAG(scale=2.0, layers=layer)]):
            got = tr(**kw)[0]
    close(want, got, effect=(want - cond).abs().max().item())


def test_flux_pipeline_runs_pag_and_maps(pipes):
    pipe = pipes["flux"]
    kw = call_kw(pipe, 16, guidance=3.5)
    bare = images(pipe, kw)
    maps = HeatMaps()
    with control(pipe, [PAG(scale=2.0, layers="transformer_blocks.1"), maps]):
        got = images(pipe, kw)
    assert (got - bare).abs().max() > 1e-3
    m = maps.maps((8, 8))
    assert m.shape == (2, 16, 8, 8) and torch.isfinite(m).all()


# Scale 0, no control, and the scope restored


@pytest.mark.parametrize("family", list(FAMILIES))
def test_neutral_controls_leave_the_pipeline_bitwise_unchanged(pipes, family):
    pipe = pipes[family]
    kw = call_kw(pipe, FAMILIES[family][1])
    bare = images(pipe, kw)
    with control(pipe, []):
        none = images(pipe, kw)
    with control(pipe, [PAG(scale=0.0, layers="**"), AttnCache(every=2, start=1.0, end=1.0)]):
        zero = images(pipe, kw)
    assert torch.equal(bare, none) and torch.equal(bare, zero)


def snapshot(pipe):
    den = getattr(pipe, "unet", None) or pipe.transformer
    return (
        {n: p for n, p in den.attn_processors.items()},
        dict(den.__dict__),
        dict(pipe.scheduler.__dict__),
    )


def test_scope_restores_processors_forward_and_scheduler(pipes):
    pipe = pipes["sd"]
    before = snapshot(pipe)
    with control(pipe, [PAG(scale=3.0, layers="mid_block"), HeatMaps()]):
        assert "forward" in pipe.unet.__dict__
        images(pipe, call_kw(pipe, 64, steps=2))
    with pytest.raises(RuntimeError, match="stop"):
        with control(pipe, [HeatMaps()]):
            raise RuntimeError("stop")
    after = snapshot(pipe)
    assert all(before[0][n] is after[0][n] for n in before[0]) and before[0].keys() == after[0].keys()
    assert before[1].keys() == after[1].keys() and "forward" not in after[1]
    assert set(before[2]) == set(after[2]) and "step" not in after[2]


def test_layers_no_control_needs_keep_diffusers_processor(pipes):
    pipe = pipes["sd"]
    with control(pipe, [PAG(scale=3.0, layers="mid_block")]):
        procs = pipe.unet.attn_processors
    with control(pipe, [PAG(scale=3.0, layers="mid_block")]):
        procs = pipe.unet.attn_processors
        wrapped = [n for n, p in procs.items() if type(p).__name__ == "BusProcessor"]
    assert wrapped == ["mid_block.attentions.0.transformer_blocks.0.attn1.processor"]
    assert all(type(p).__name__ == "AttnProcessor2_0" for n, p in procs.items() if n not in wrapped)


# Heat maps: probabilities and the DAAM aggregation


class Capture(Control):
    """Records every cross-attention probability tensor the bus hands to controls (cond rows)."""

    kind = "cross"

    def __init__(self, kinds=("cross",)):
        self.kinds, self.seen = kinds, []

    def select(self, model):
        from attnlab.attention import select_layers

        return select_layers(model, "**", self.kinds)

    def needs_probs(self, call):
        return True

    def probs(self, call, p):
        self.seen.append((call.name, call.roles, p.detach().clone()))
        return p


class ScoresProcessor:
    """diffusers' own explicit path (`Attention.get_attention_scores`), recording each map."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        b = hidden_states.shape[0]
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k, v = attn.head_to_batch_dim(attn.to_k(ctx)), attn.head_to_batch_dim(attn.to_v(ctx))
        mask = (
            None if attention_mask is None else attn.prepare_attention_mask(attention_mask, ctx.shape[1], b)
        )
        p = attn.get_attention_scores(q, k, mask)
        self.log.append((self.name, p.view(b, attn.heads, *p.shape[1:]).clone()))
        out = attn.batch_to_head_dim(torch.bmm(p, v))
        return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("family", ["sd", "sdxl", "pixart"])
def test_probabilities_equal_get_attention_scores(pipes, family):
    pipe = pipes[family]
    den = getattr(pipe, "unet", None) or pipe.transformer
    kw = call_kw(pipe, FAMILIES[family][1], steps=2)
    cap = Capture()
    with control(pipe, [cap]):
        images(pipe, kw)
    log: list = []
    saved = den.attn_processors
    cross = {n.rsplit(".", 1)[0] for n in saved if ".attn2." in n + "."}
    den.set_attn_processor(
        {
            n: (ScoresProcessor(n.rsplit(".", 1)[0], log) if n.rsplit(".", 1)[0] in cross else p)
            for n, p in saved.items()
        }
    )
    try:
        images(pipe, kw)
    finally:
        den.set_attn_processor(saved)
    assert len(log) == len(cap.seen) > 0
    for (name, p_ref), (ours, _, p) in zip(log, cap.seen):
        assert name == ours
        close(p_ref, p)


def daam(
    maps_per_step: dict[str, list[torch.Tensor]], size: tuple[int, int], factor: float = 8
) -> torch.Tensor:
    """DAAM's aggregation written from its paper and code: per layer and head the cond rows' maps
    summed over steps, each (layer, head) map upsampled bicubically to the latent size and clamped
    at zero, the mean over layers and heads; layers at least `factor` times coarser are skipped."""
    kept = []
    for ps in maps_per_step.values():
        s = torch.stack(ps).sum(0)  # (B, heads, N, L)
        side = int(math.isqrt(s.shape[2]))
        if size[0] / side >= factor:
            continue
        g = s.permute(0, 1, 3, 2).reshape(s.shape[0], s.shape[1] * s.shape[3], side, side)
        up = F.interpolate(g, size=size, mode="bicubic", align_corners=False).clamp(min=0)
        kept.append(up.view(s.shape[0], s.shape[1], s.shape[3], *size))
    return torch.cat(kept, 1).mean(1)  # (B, L, *size)


def test_sd_heat_maps_equal_daam_aggregation(pipes):
    pipe = pipes["sd"]
    kw = call_kw(pipe, 64, steps=3)
    cap, maps = Capture(), HeatMaps()
    with control(pipe, [cap, maps]):
        images(pipe, kw)
    per: dict[str, list] = {}
    for name, roles, p in cap.seen:
        per.setdefault(name, []).append(p[p.shape[0] // len(roles) * roles.index("cond") :])
    want = daam(per, (32, 32))
    got = maps.maps((32, 32))
    close(want, got)


class SDPACapture(TorchFunctionMode):
    """The model's own SDPA inputs (q, k after its norms and RoPE), every call."""

    def __init__(self):
        super().__init__()
        self.qk = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            self.qk.append((q.detach().clone(), k.detach().clone()))
        return func(*args, **kwargs)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_maps_equal_the_models_own_sdpa_inputs(pipes, family):
    """On joint attention the maps are softmax(q k^T / sqrt(d)) of the model's own q and k (read
    here from its SDPA call), image queries x text keys, renormalised over the text."""
    pipe = pipes[family]
    tr = pipe.transformer
    kw = call_kw(pipe, FAMILIES[family][1], steps=2, guidance=5.0 if family == "sd3" else 3.5)
    cap = Capture(kinds=("joint",))
    with control(pipe, [cap]):
        images(pipe, kw)
    mode = SDPACapture()  # inside the transformer only (the text encoders call SDPA too)

    def enter(module, args):
        mode.__enter__()

    def leave(module, args, out):
        mode.__exit__(None, None, None)

    hooks = [tr.register_forward_pre_hook(enter), tr.register_forward_hook(leave)]
    try:
        images(pipe, kw)
    finally:
        for h in hooks:
            h.remove()
    assert len(mode.qk) == len(cap.seen) > 0
    n_txt = None
    for (q, k), (_, _, p) in zip(mode.qk, cap.seen):
        s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        full = s.softmax(-1)
        close(full, p)
        n = p.shape[-1]
        n_txt = n_txt or n - 256 if family == "sd3" else n - 64  # 16 x 16 and 8 x 8 image tokens
    assert n_txt and n_txt > 0
    maps = HeatMaps()
    with control(pipe, [maps]):
        images(pipe, kw)
    got = maps.maps((16, 16) if family == "sd3" else (8, 8))
    assert torch.isfinite(got).all() and got.shape[1] == n_txt
    # each joint layer's recorded block sums to one over the text keys at every image query
    recorded = next(iter(maps.sums.values()))  # (B, heads, L, *grid) summed over 2 steps
    total = recorded.sum(2)
    close(total, torch.full_like(total, 2.0))


# Bad input


def test_pattern_selecting_no_layer_names_it_and_the_layers(pipes):
    pipe = pipes["sd"]
    with pytest.raises(ConfigError, match=r"layers=\('up_blocks\.9',\).*mid_block\.attentions\.0"):
        with control(pipe, [PAG(scale=1.0, layers="up_blocks.9")]):
            pass
    assert "forward" not in pipe.unet.__dict__


def test_maps_on_a_model_without_text_is_refused():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="heatmaps.*selects no cross"):
        with control(unet, [HeatMaps()]):
            pass


def test_not_a_pipeline_is_refused():
    class Thing:
        pass

    with pytest.raises(ConfigError, match="Thing.*unet.*transformer"):
        from attnlab.integrations.diffusers import control as host_control

        with host_control(Thing(), [HeatMaps()]):
            pass


def test_an_object_that_is_no_control_is_refused(pipes):
    with pytest.raises(ConfigError, match="neither an attention control nor a guidance term"):
        with control(pipes["sd"], ["pag"]):
            pass


def test_pags_perturbed_pass_rides_in_the_main_call(pipes):
    """As diffusers' PAG pipelines batch [uncond, cond, perturbed], the host runs one U-Net
    forward per step: the perturbed rows beside the CFG rows, each attention layer's controls
    seeing each group of rows under its own roles."""
    pipe = pipes["sd"]
    kw = call_kw(pipe, 64, steps=3)
    batches = []
    hook = pipe.unet.conv_in.register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0]))
    try:
        with control(pipe, [PAG(scale=3.0, layers="mid_block")]):
            images(pipe, kw)
        with control(pipe, [PAG(scale=3.0, layers="mid_block", adaptive_scale=1.0)]):  # s(t) = 0
            images(pipe, kw)
    finally:
        hook.remove()
    assert batches == [6, 6, 6, 4, 4, 4]  # 2 prompts: uncond + cond + perturbed, then no pass
