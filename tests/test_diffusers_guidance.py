"""SAG and Attend-and-Excite on stock diffusers pipelines, through attnlab's host.

SD 1.x is compared with diffusers' own pipelines (`StableDiffusionSAGPipeline`,
`StableDiffusionAttendAndExcitePipeline`) on the same weights. SDXL, PixArt-Sigma, SD3 and Flux have
no such pipeline: there the reference is the algorithm written in this file from the paper and the
SD pipelines' code, run inside the stock pipeline by a forward wrapper of this file: attention maps
captured from the denoiser's own SDPA calls (a TorchFunctionMode computing softmax(q k^T / sqrt(d))
explicitly), the blur, the x0 / noise algebra (DDIM's for eps models, the flow's for SD3 and Flux),
the re-noising and the latent updates. Nothing here asks attnlab for an expected value. Every case
must agree to 1e-5 of the output's scale in fp32, and the control's own effect must be 100x that.
"""

import inspect
import math

import diffusers_tiny as tiny
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from attnlab.attention import control
from attnlab.control import SAG, AttendExcite

REL_TOL = 1e-5
PROMPTS = ["a red car", "a blue cat"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _check(got, want, bare):
    tol = REL_TOL * want.abs().max()
    diff, effect = (got - want).abs().max(), (want - bare).abs().max()
    assert diff <= tol, float(diff / want.abs().max())
    assert effect >= 100 * tol, float(effect / want.abs().max())


def _kw(pipe, size, steps=3, guidance=5.0):
    kw = dict(
        prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
        latents=tiny.latents(pipe, len(PROMPTS), size), height=size, width=size,
    )  # fmt: skip
    name = type(pipe).__name__
    if name.startswith(("PixArt", "StableDiffusion3", "Flux")):
        kw["max_sequence_length"] = 16
    if name.startswith("PixArt"):
        kw["use_resolution_binning"] = False
    return kw


def _run(pipe, kw, controls=None):
    if controls is None:
        return pipe(**kw).images
    with control(pipe, controls):
        return pipe(**kw).images


# Attention maps from the denoiser's own SDPA calls


class ExplicitSDPA(TorchFunctionMode):
    """SDPA as softmax(q k^T * scale + mask) @ v, each map handed to `sink` (with its graph)."""

    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        named = dict(zip(("query", "key", "value", "attn_mask"), args), **kwargs)
        q, k, v, mask = named["query"], named["key"], named["value"], named.get("attn_mask")
        s = (q @ k.transpose(-1, -2)) * (named.get("scale") or q.shape[-1] ** -0.5)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        p = s.softmax(-1)
        self.sink(p)
        return p @ v


class Capture:
    """The maps of the chosen attention modules during the forwards run inside the block."""

    def __init__(self, modules):
        self.modules, self.maps, self.handles = modules, [], []

    def __enter__(self):
        def pre(m, *a):
            self.current = m

        def post(m, *a):
            self.current = None

        self.current = None
        for m in self.modules:
            self.handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        self.mode = ExplicitSDPA(lambda p: self.maps.append(p) if self.current is not None else None)
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        for h in self.handles:
            h.remove()


def _image_block(p, family, n_txt):
    """(B, heads, N_img, N_img) image-to-image part of a joint map, renormalised over image keys."""
    if family == "sd3":
        p = p[:, :, :-n_txt, :-n_txt]
    elif family == "flux":
        p = p[:, :, n_txt:, n_txt:]
    return p / p.sum(-1, keepdim=True)


def _text_block(p, family, n_txt):
    """(B, heads, N_img, N_txt) image-to-text part of a joint map, renormalised over text keys."""
    if family == "sd3":
        p = p[:, :, :-n_txt, -n_txt:]
    elif family == "flux":
        p = p[:, :, n_txt:, :n_txt]
    else:
        return p
    return p / p.sum(-1, keepdim=True)


# The denoiser call, seen from a wrapper of this file


class Wrapped:
    """The pipeline's denoiser forward replaced by `fn(call)` for a block; `call` holds the bound
    arguments, the sample key, the CFG layout and `run(**changes)` (the original forward)."""

    def __init__(self, pipe, fn):
        self.pipe, self.fn = pipe, fn
        self.den = getattr(pipe, "unet", None) or pipe.transformer
        self.orig = self.den.forward
        self.sig = inspect.signature(self.orig)
        self.key = "sample" if "sample" in self.sig.parameters else "hidden_states"

    def __enter__(self):
        def forward(*args, **kwargs):
            kw = dict(self.sig.bind(*args, **kwargs).arguments)
            return self.fn(self, kw)

        self.den.forward = forward
        return self

    def __exit__(self, *exc):
        del self.den.forward

    def rows(self, kw, rows, b):
        def pick(v):
            if isinstance(v, dict):
                return {k: pick(x) for k, x in v.items()}
            return v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b else v

        return {k: pick(v) for k, v in kw.items()}

    def pred(self, kw):
        out = self.orig(**{**kw, "return_dict": False})
        return out[0]


def _family(pipe):
    name = type(pipe).__name__
    return "flux" if name.startswith("Flux") else "sd3" if name.startswith("StableDiffusion3") else "unet"


def _layout(pipe, kw, b):
    """Whether the batch is [uncond; cond], and the image conversions (Flux packs 2x2 patches)."""
    x = kw["hidden_states" if "hidden_states" in kw else "sample"]
    cfg = b % 2 == 0 and bool(torch.equal(x[: b // 2], x[b // 2 :]))
    if _family(pipe) != "flux":
        return cfg, (lambda z: z), (lambda z: z)
    side = 2 * int(math.isqrt(x.shape[1]))
    c = x.shape[-1] // 4

    def unpack(z):
        return pipe._unpack_latents(z, side, side, 1)  # (B, C, side, side)

    return cfg, unpack, lambda z: pipe._pack_latents(z, z.shape[0], c, side, side)


# SAG, written from StableDiffusionSAGPipeline and the paper


def gaussian_blur_2d(img, kernel_size=9, sigma=1.0):
    """diffusers' SAG `gaussian_blur_2d`."""
    half = (kernel_size - 1) * 0.5
    pdf = torch.exp(-0.5 * (torch.linspace(-half, half, steps=kernel_size) / sigma).pow(2))
    k1 = (pdf / pdf.sum()).to(img)
    k2 = torch.mm(k1[:, None], k1[None, :]).expand(img.shape[-3], 1, kernel_size, kernel_size)
    return F.conv2d(F.pad(img, [kernel_size // 2] * 4, mode="reflect"), k2, groups=img.shape[-3])


def _x0_noise(pipe, x, pred, kw):
    """DDIM's x0 / eps for eps models (the denoiser's input), the flow's x0 / noise for SD3 and Flux."""
    t = torch.as_tensor(kw["timestep"]).flatten()[0]
    fam = _family(pipe)
    if fam == "unet":
        ab = pipe.scheduler.alphas_cumprod[int(t.round())]
        x0 = (x - (1 - ab) ** 0.5 * pred) / ab**0.5
        return x0, pred, lambda x0d: ab**0.5 * x0d + (1 - ab) ** 0.5 * pred
    sigma = t / 1000 if fam == "sd3" else t  # Flux's transformer gets timestep / 1000
    x0, noise = x - sigma * pred, x + (1 - sigma) * pred
    return x0, noise, lambda x0d: (1 - sigma) * x0d + sigma * noise


def sag_reference(pipe, module, scale):
    fam = _family(pipe)

    def fn(w, kw):
        x = kw[w.key]
        b = x.shape[0]
        cfg, unpack, pack = _layout(w.pipe, kw, b)
        with Capture([module]) as cap:
            pred = w.pred(kw)
        rows = slice(0, b // 2) if cfg else slice(0, b)  # Eq. 25: the uncond rows under CFG
        ehs = kw.get("encoder_hidden_states")
        p = _image_block(cap.maps[0][rows], fam, ehs.shape[1] if fam != "unet" else 0)
        mass = p.mean(1).sum(1)  # (n, N): the attention each key receives
        side = int(math.isqrt(mass.shape[1]))
        img = unpack(x[rows])
        mask = (mass > 1.0).view(-1, 1, side, side).repeat(1, img.shape[1], 1, 1).float()
        mask = F.interpolate(mask, img.shape[-2:])
        branch = pred[rows]
        x0, noise, renoise = _x0_noise(w.pipe, img, unpack(branch)[:, : img.shape[1]], kw)
        degraded = pack(renoise(gaussian_blur_2d(x0) * mask + x0 * (1 - mask)))
        deg_pred = w.pred({**w.rows(kw, rows, b), w.key: degraded})
        term = scale * (branch - deg_pred)
        out = pred + term.repeat(b // term.shape[0], *[1] * (term.dim() - 1))
        return (out,) if not kw.get("return_dict", True) else type("Out", (), {"sample": out})()

    return Wrapped(pipe, fn)


def _sag_module(pipe):
    fam = _family(pipe)
    if fam == "unet":
        den = getattr(pipe, "unet", None)
        if den is not None:
            return den.mid_block.attentions[0].transformer_blocks[0].attn1
        blocks = pipe.transformer.transformer_blocks
        return blocks[len(blocks) // 2].attn1
    blocks = pipe.transformer.transformer_blocks
    return blocks[len(blocks) // 2].attn


def test_sag_equals_diffusers_sag_pipeline_on_sd():
    from diffusers import StableDiffusionSAGPipeline

    pipe = tiny.sd()
    # the SAG pipeline reads `attention_head_dim` as a list (a tuple fails its reshape)
    pipe.unet.register_to_config(attention_head_dim=list(pipe.unet.config.attention_head_dim))
    ref = tiny._build(StableDiffusionSAGPipeline, pipe.components)
    for guidance in (5.0, 1.0):
        kw = _kw(pipe, 32, guidance=guidance)
        want = ref(**kw, sag_scale=0.75).images
        _check(_run(pipe, kw, [SAG()]), want, _run(pipe, kw))


FAMILIES = {
    "sdxl": (tiny.sdxl, 32),
    "pixart": (tiny.pixart, 16),
    "sd3": (tiny.sd3, 16),
    "flux": (tiny.flux, 16),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sag_equals_the_algorithm_written_here(family):
    build, size = FAMILIES[family]
    pipe = build()
    kw = _kw(pipe, size)
    with torch.no_grad(), sag_reference(pipe, _sag_module(pipe), 0.75):
        want = pipe(**kw).images
    _check(_run(pipe, kw, [SAG()]), want, _run(pipe, kw))


def test_sag_default_layer_on_diffusers_denoisers():
    from attnlab.integrations.diffusers.host import hosted_layers

    for build, want in [
        (tiny.sd, "mid_block.attentions.0.transformer_blocks.0.attn1"),
        (tiny.pixart, "transformer_blocks.6.attn1"),
        (tiny.sd3, "transformer_blocks.1.attn"),
        (tiny.flux, "transformer_blocks.1.attn"),
    ]:
        p = build()
        den = getattr(p, "unet", None) or p.transformer
        den.attnlab_layers = hosted_layers(den)
        try:
            assert [m.name for m in SAG().controls()[0].select(den)] == [want]
        finally:
            del den.attnlab_layers


# Attend-and-Excite, written from StableDiffusionAttendAndExcitePipeline


def _smooth_max(image):
    """diffusers' A&E `GaussianSmoothing()` (3x3, sigma 0.5) on a reflect-padded map, then its max."""
    mean, sigma = 1.0, 0.5
    g = torch.arange(3, dtype=torch.float32)
    k1 = 1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-(((g - mean) / (2 * sigma)) ** 2))
    k = torch.outer(k1, k1)
    k = (k / k.sum()).to(image).view(1, 1, 3, 3)
    return F.conv2d(F.pad(image[None, None], (1, 1, 1, 1), mode="reflect"), k)[0, 0].max()


def _excite_loss(maps, res, indices):
    """`_aggregate_and_get_max_attention_per_token` + `_compute_loss` over (layers x heads, N, L) maps."""
    attention = maps.mean(0).reshape(*res, maps.shape[-1])
    text = (attention[:, :, 1:-1] * 100).softmax(-1)
    peaks = [_smooth_max(text[:, :, i - 1]) for i in indices]
    return max(max(0, 1.0 - p) for p in peaks)


def excite_reference(pipe, indices, res, max_iter, thresholds, scale_factor=20.0, max_refine=20):
    fam = _family(pipe)
    den = getattr(pipe, "unet", None) or pipe.transformer
    if fam == "unet":
        modules = [m for n, m in den.named_modules() if n.endswith("attn2")]
    else:
        modules = [m for n, m in den.named_modules() if n.endswith(".attn")]
    sched, state = pipe.scheduler, {"i": 0, "pending": None}
    step = sched.step

    def wrapped_step(out, t, sample, *a, **k):
        if state["pending"] is not None:
            sample = state["pending"]
        state["pending"] = None
        state["i"] += 1
        return step(out, t, sample, *a, **k)

    def fn(w, kw):
        x = kw[w.key]
        b = x.shape[0]
        cfg, _, _ = _layout(w.pipe, kw, b)
        n = b // 2 if cfg else b
        i = state["i"]
        scale = getattr(sched, "scale_model_input", None)
        c = scale(torch.ones_like(x[:1]), sched.timesteps[i]) if scale is not None else 1.0
        z = x[b - n :] / c  # the cond rows' latents
        step_size = scale_factor * np.sqrt(np.linspace(1.0, 0.5, len(sched.timesteps)))[i]
        n_txt = kw["encoder_hidden_states"].shape[1]

        def loss_at(latent, r):
            rows = slice(b - n + r, b - n + r + 1)
            with Capture(modules) as cap:
                w.pred({**w.rows(kw, rows, b), w.key: latent * c})
            maps = [_text_block(p, fam, n_txt) for p in cap.maps]
            maps = torch.cat([p[0] for p in maps if p.shape[-2] == res[0] * res[1]])  # (layers*heads, N, L)
            return _excite_loss(maps, res, indices[r])

        def update(latent, loss):
            if loss == 0:
                return latent
            (grad,) = torch.autograd.grad(loss, [latent])
            return latent - step_size * grad

        new = []
        with torch.enable_grad():
            for r in range(n):
                latent = z[r : r + 1].clone().requires_grad_(True)
                loss = loss_at(latent, r)
                if i in thresholds and loss > 1.0 - thresholds[i]:
                    it = 0
                    while loss > max(0, 1.0 - thresholds[i]):
                        it += 1
                        latent = latent.clone().detach().requires_grad_(True)
                        loss = loss_at(latent, r)
                        latent = update(latent, loss)
                        if it >= max_refine:
                            break
                    latent = latent.clone().detach().requires_grad_(True)
                    loss = loss_at(latent, r)
                if i < max_iter:
                    latent = update(latent, loss)
                new.append(latent.detach())
        z = torch.cat(new)
        state["pending"] = z
        out = w.pred({**kw, w.key: torch.cat([z * c] * (b // n))})
        return (out,) if not kw.get("return_dict", True) else type("Out", (), {"sample": out})()

    class Ref(Wrapped):
        def __enter__(self):
            sched.step = wrapped_step
            return super().__enter__()

        def __exit__(self, *exc):
            del sched.step
            return super().__exit__(*exc)

    return Ref(pipe, fn)


def test_attend_and_excite_equals_diffusers_pipeline_on_sd():
    from diffusers import StableDiffusionAttendAndExcitePipeline

    pipe = tiny.sd()
    ref = tiny._build(StableDiffusionAttendAndExcitePipeline, pipe.components)
    kw = _kw(pipe, 32)
    idx, thresholds = [[2, 3], [3]], {0: 0.05}
    want = ref(**kw, token_indices=idx, max_iter_to_alter=25, thresholds=thresholds, attn_res=(8, 8)).images
    ae = AttendExcite.diffusers(idx, thresholds=thresholds, attn_res=(8, 8))
    _check(_run(pipe, kw, [ae]), want, _run(pipe, kw))
    assert ae.refinements[0] == [20, 20]  # the refinement ran (and hit the pipeline's cap)


EXCITE = {  # builder, image size, attn_res, token indices, step size (Euler's latents are ~sigma_max larger)
    "sdxl": (tiny.sdxl, 32, (8, 8), [[2, 3], [3]], 2000.0),
    "pixart": (tiny.pixart, 16, (4, 4), [[1, 2], [2]], 200.0),
    "sd3": (tiny.sd3, 16, (8, 8), [[2, 3], [3]], 200.0),
    "flux": (tiny.flux, 16, (8, 8), [[1, 2], [2]], 200.0),
}


@pytest.mark.parametrize("family", list(EXCITE))
def test_attend_and_excite_equals_the_algorithm_written_here(family):
    build, size, res, idx, step = EXCITE[family]
    pipe = build()
    kw = _kw(pipe, size)
    thresholds = {0: 0.05}  # refined at step 0, at most twice (the pipeline: 20), larger steps
    with torch.no_grad(), excite_reference(pipe, idx, res, 25, thresholds, scale_factor=step, max_refine=2):
        want = pipe(**kw).images
    ae = AttendExcite.diffusers(idx, thresholds=thresholds, attn_res=res, step_size=step, max_refine=2)
    _check(_run(pipe, kw, [ae]), want, _run(pipe, kw))


# Off is off


def test_scale_zero_is_the_bare_pipeline():
    pipe = tiny.sd()
    kw = _kw(pipe, 32)
    bare = _run(pipe, kw)
    assert torch.equal(_run(pipe, kw, [SAG(scale=0.0)]), bare)
    assert torch.equal(_run(pipe, kw, [AttendExcite.diffusers([[2], [3]], step_size=0.0)]), bare)
