"""Real-image inversion and editing on a Stable Diffusion pipeline: the image is encoded by the
pipeline's VAE, inverted in latent space by `attnlab.control.inversion` (DDIM, null-text, DDPM),
then sampled back by the pipeline's own call from the inverted latents, with Prompt-to-Prompt and
a mask blend installed through the host; the input is pasted back outside a mask after decoding.

The pipeline samples with a DDIM scheduler built on its own scheduler's config for the call (the
edit-friendly noise maps ride in `NoiseMapScheduler`); a null-text embedding per step reaches the
pipeline's CFG batch through `callback_on_step_end`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from attnlab.control.edit import MaskBlend, RealEdit, paste
from attnlab.control.inversion import Inversion, invert, psnr
from attnlab.errors import ConfigError
from attnlab.integrations.diffusers.load import denoiser, family

FAMILIES = ("sd",)  # U-Net pipelines on one CLIP text (SDXL adds micro-conditions; flows have no DDIM)


def check_pipeline(pipe) -> None:
    fam = family(pipe)
    if fam not in FAMILIES:
        raise ConfigError(
            f"real-image editing runs on Stable Diffusion 1.x/2.x pipelines; this one is {fam} "
            "(SDXL's micro-conditions and SD3/Flux's flow schedulers are not inverted yet)"
        )


def image_size(pipe) -> tuple[int, int]:
    """(H, W) the pipeline draws by default (its U-Net's sample size times the VAE's factor)."""
    s = denoiser(pipe).config.sample_size * pipe.vae_scale_factor
    return (s, s)


def check_caption(pipe, caption: str, flag: str = "--prompt") -> None:
    """Refuse a caption the pipeline's CLIP cannot encode whole: empty, or longer than its 77 tokens."""
    if not caption.strip():
        raise ConfigError(f"{flag} {caption!r}: the caption is empty")
    tok = pipe.tokenizer
    n = len(tok(caption).input_ids)
    if n > tok.model_max_length:
        raise ConfigError(
            f"{flag} {caption!r}: {n} tokens, the pipeline's text encoder keeps {tok.model_max_length}"
        )


@torch.no_grad()
def encode_image(pipe, image: Tensor) -> Tensor:
    """(1, 4, h, w) latents of a (3, H, W) image in [-1, 1]: the VAE posterior's mode, scaled."""
    vae = pipe.vae
    x = image[None].to(vae.device, vae.dtype)
    return vae.encode(x).latent_dist.mode() * vae.config.scaling_factor


@torch.no_grad()
def decode(pipe, z: Tensor) -> Tensor:
    """(B, 3, H, W) images in [-1, 1] of latents (the VAE's decoder, unscaled)."""
    return pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample.float().clamp(-1, 1)


class UNetDenoiser:
    """The pipeline's U-Net under one caption (`attnlab.control.inversion.Denoiser`); the
    unconditional embedding is the empty prompt's CLIP states (1, 77, D), as null-text optimises."""

    def __init__(self, pipe, caption: str):
        self.pipe, self.calls = pipe, 0
        self.text, self.empty = embeddings(pipe, [caption])

    def _call(self, x: Tensor, t: Tensor, emb: Tensor) -> Tensor:
        self.calls += 1
        unet = self.pipe.unet
        return unet(x.to(unet.dtype), t, encoder_hidden_states=emb.to(unet.dtype)).sample.to(x.dtype)

    def cond(self, x: Tensor, t: Tensor) -> Tensor:
        return self._call(x, t, self.text)

    def uncond(self, x: Tensor, t: Tensor, null: Tensor | None = None) -> Tensor:
        return self._call(x, t, self.empty if null is None else null)

    def null(self) -> Tensor:
        return self.empty


@torch.no_grad()
def embeddings(pipe, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """(B, 77, D) CLIP states of `prompts` and of the empty prompt, as the pipeline encodes them."""
    text, empty = pipe.encode_prompt(list(prompts), pipe.device, 1, True, negative_prompt=[""] * len(prompts))
    return text.float(), empty[:1].float()


@contextlib.contextmanager
def scheduler_of(pipe, inv: Inversion) -> Iterator[None]:
    """The pipeline samples with the inversion's scheduler for the block."""
    old = pipe.scheduler
    pipe.scheduler = inv.scheduler()
    try:
        yield
    finally:
        pipe.scheduler = old


def replay(pipe, prompts: Sequence[str], inv: Inversion, controls: Sequence = ()) -> Tensor:
    """The pipeline's own call from the inversion's latents for every prompt (row 0 the source),
    with `controls` (Prompt-to-Prompt, a mask blend) installed through the host.

    Returns:
        (len(prompts), 3, H, W) images in [-1, 1] on the CPU.
    """
    from attnlab.attention import control

    rows = len(prompts)
    text, empty = embeddings(pipe, prompts)
    nulls = inv.nulls

    def next_null(p, i, t, kw):  # step i is done: the CFG batch's uncond rows get step i + 1's embedding
        if nulls is None or i + 1 >= len(nulls) or "prompt_embeds" not in kw:
            return {}
        emb = kw["prompt_embeds"].clone()
        emb[:rows] = nulls[i + 1].to(emb)
        return {"prompt_embeds": emb}

    first = empty if nulls is None else nulls[0]
    kw = dict(
        prompt_embeds=text.to(pipe.unet.dtype),
        negative_prompt_embeds=first.expand(rows, -1, -1).to(pipe.unet.dtype),
        latents=inv.x_T.expand(rows, -1, -1, -1).to(pipe.unet.dtype),
        num_inference_steps=inv.steps,
        guidance_scale=inv.guidance,
        output_type="pt",
        callback_on_step_end=next_null,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )
    with scheduler_of(pipe, inv), control(pipe, list(controls)) if controls else contextlib.nullcontext():
        images = pipe(**kw).images
    return images.float().cpu() * 2 - 1


def edit_image(
    pipe,
    image: Tensor,
    source: str,
    edits: Sequence[str],
    p2p,
    *,
    method: str,
    steps: int,
    guidance: float,
    seed: int = 0,
    mask: Tensor | None = None,
    inner_steps: int = 10,
) -> RealEdit:
    """Invert a real image under its caption with the pipeline and edit it from the inverted latents.

    Args:
        pipe: a Stable Diffusion pipeline (`FAMILIES`).
        image: (3, H, W) in [-1, 1] at the pipeline's size; source: its caption; edits: edited
            captions (may be empty); p2p: Prompt-to-Prompt settings (bound here), None with no edits.
        method, steps, guidance, seed, inner_steps: as `attnlab.control.edit.edit_image`.
        mask: (1, H, W) in {0, 1}: blended in latent space after every step (a latent cell is in
            the region when any of its pixels is), then the input pasted back outside it.
    Returns:
        A RealEdit; its psnr is the reconstruction's against the input, VAE round trip included.
    """
    from attnlab.integrations.diffusers.words import bind_p2p

    check_pipeline(pipe)
    for k, caption in enumerate([source, *edits]):
        check_caption(pipe, caption, "--prompt" if k == 0 else "--edit")
    start = time.perf_counter()
    z0 = encode_image(pipe, image).float()
    inv = invert(
        UNetDenoiser(pipe, source), z0, method, scheduler=pipe.scheduler, steps=steps, guidance=guidance,
        seed=seed, inner_steps=inner_steps,
    )  # fmt: skip
    prompts = [source, *edits]
    controls: list = []
    if edits:
        bind_p2p(pipe, prompts, p2p)
        controls = [p2p, *([MaskBlend(mask[None])] if mask is not None else [])]
    mid = time.perf_counter()
    x = replay(pipe, prompts, inv, controls)
    end = time.perf_counter()
    out = paste(image[None].cpu(), x[1:], None if mask is None else mask[None])
    seconds = {"inversion": inv.seconds, "sampling": end - mid, "total": end - start}
    inv.info["vae_psnr"] = round(psnr(decode(pipe, z0).cpu()[0], image.cpu()), 3)
    return RealEdit(inv, x[0], out, psnr(x[0], image.cpu()), seconds)
