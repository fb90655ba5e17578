"""Prompt-to-Prompt editing end to end: encode the prompts, sample source and edits in one batch;
for a real image, invert it first (`attnlab.control.inversion`) and edit from its noise."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from attnlab.conditioning import Condition
from attnlab.control.inversion import Inversion, StepHook
from attnlab.control.p2p import PromptToPrompt
from attnlab.diffusion import sample
from attnlab.errors import ConfigError


def word_finder(encoder, prompts: Sequence[str]) -> Callable[[int, str], list[int]]:
    """(row, word) -> the word's token positions in prompts[row], [] when it is absent."""

    def find(row: int, word: str) -> list[int]:
        try:
            return encoder.word_token_indices(prompts[row], word)
        except ConfigError:
            return []

    return find


def text_condition(encoder, prompts: Sequence[str], device="cpu") -> Condition:
    tokens, mask = encoder.encode(list(prompts))
    return Condition(tokens=tokens.float().to(device), mask=mask.bool().to(device))


def edit(
    model: nn.Module,
    encoder,
    source: str,
    edits: Sequence[str],
    p2p: PromptToPrompt,
    *,
    shape: Sequence[int],
    scheduler,
    steps: int,
    guidance: float,
    seed: int = 0,
    guidances: Sequence = (),
) -> Tensor:
    """Sample `source` and every prompt of `edits` from the same noise, edited by Prompt-to-Prompt.

    Args:
        model: a text-conditioned denoiser.
        encoder: the text encoder (`encode`, `tokens_of`, `word_token_indices`).
        source: the source prompt; edits: the edited prompts.
        p2p: the edit settings; bound to these prompts here.
        shape: (C, *spatial) of one sample.
        scheduler, steps, guidance: the sampling loop's settings.
        seed: the noise seed shared by every row.
        guidances: further guidance terms (PAG, SAG, ...) applied to every row.
    Returns:
        (1 + len(edits), C, *spatial): row 0 the source, then one row per edit.
    """
    prompts = [source, *edits]
    if not edits:
        raise ConfigError("edit: give at least one edited prompt")
    p2p.bind([encoder.tokens_of(p) for p in prompts], word_finder(encoder, prompts))
    device = next(model.parameters()).device
    cond = text_condition(encoder, prompts, device)
    x = sample(
        model,
        (len(prompts), *shape),
        cond,
        scheduler=scheduler,
        steps=steps,
        guidance=guidance,
        seeds=[seed] * len(prompts),
        guidances=[p2p, *guidances],
    )
    return p2p.after_step(x, steps - 1, steps)  # Prompt-to-Prompt blends after every step, the last one too


# Real images: invert, then edit from the inverted noise


def read_image(
    path, size: Sequence[int], channels: int = 3, kind: str = "image"
) -> tuple[Tensor, str | None]:
    """An image file as (channels, H, W) in [-1, 1] at `size` (H, W): centre-cropped to that
    aspect, then resized (bicubic; a mask nearest, thresholded at half). Returns it and a note
    saying what was done when the file had another size, else None.

    Raises:
        DataError: the file is missing or is not an image PIL can read.
    """
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from attnlab.errors import DataError

    h, w = int(size[0]), int(size[1])
    try:
        with Image.open(path) as im:
            im.load()
            img = im.convert("L" if channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        reason = "no such file" if isinstance(e, FileNotFoundError) else f"not an image PIL can read ({e})"
        raise DataError(f"--{kind} {path}: {reason}") from None
    W, H = img.size
    note = None
    if (W, H) != (w, h):
        cw, ch = (W, round(W * h / w)) if W * h < w * H else (round(H * w / h), H)
        left, top = (W - cw) // 2, (H - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
        img = img.resize((w, h), Image.NEAREST if kind == "mask" else Image.BICUBIC)
        note = f"{path} is {W}x{H}: centre-cropped to {cw}x{ch} and resized to {w}x{h}"
    a = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(a).view(h, w, -1).permute(2, 0, 1)
    return x * 2 - 1, note


def read_mask(path, size: Sequence[int]) -> tuple[Tensor, str | None]:
    """A mask file (white = the region an edit may change) as (1, H, W) in {0, 1} at `size`.

    Raises:
        DataError: unreadable, or it selects no pixel.
    """
    from attnlab.errors import DataError

    m, note = read_image(path, size, channels=1, kind="mask")
    m = (m > 0).float()
    if not m.any():
        raise DataError(f"--mask {path}: selects no pixel (white marks the region to edit)")
    return m, note


def check_caption(encoder, caption: str, flag: str = "--prompt") -> None:
    """Refuse a caption the text encoder cannot encode faithfully: empty, longer than it keeps, or
    with pieces it does not know ([UNK])."""
    if not caption.strip():
        raise ConfigError(f"{flag} {caption!r}: the caption is empty")
    if len(encoder.tokenizer(caption)["input_ids"]) > encoder.max_len:
        raise ConfigError(
            f"{flag} {caption!r}: longer than the {encoder.max_len} word pieces the text encoder keeps"
        )
    unknown = [t for t in encoder.tokens_of(caption) if t == encoder.tokenizer.unk_token]
    if unknown:
        raise ConfigError(
            f"{flag} {caption!r}: holds characters the text encoder does not know ({len(unknown)} [UNK] pieces)"
        )


@dataclass(eq=False)
class MaskBlend(StepHook):
    """Restricts the edit rows to a region: after every step x[r] = x[0] + m (x[r] - x[0]), with row
    0 the source (the local blend's formula, with a given mask). The mask (1, 1, *S) is at image
    resolution; on a latent grid a cell is in the region when any of its pixels is (max-pooled)."""

    mask: Tensor

    def prepare(self, model, x: Tensor, t: Tensor, cond, ctx: dict) -> Tensor:
        return self.after_step(x, ctx["i"] - 1, ctx["steps"])

    def after_step(self, x: Tensor, k: int, steps: int) -> Tensor:
        import torch

        if k < 0 or x.shape[0] < 2:
            return x
        m = fit_mask(self.mask, tuple(x.shape[2:])).to(x)
        return torch.cat([x[:1], x[:1] + m * (x[1:] - x[:1])])


def fit_mask(mask: Tensor, size: tuple[int, ...]) -> Tensor:
    """(1, 1, *size): the mask on another grid, a cell set when any pixel under it is set."""
    import torch.nn.functional as F

    m = mask.float().reshape(1, 1, *mask.shape[-len(size) :])
    return m if tuple(m.shape[2:]) == size else F.adaptive_max_pool2d(m, size)


def paste(image: Tensor, edited: Tensor, mask: Tensor | None) -> Tensor:
    """The input image outside the mask, the edit inside it (unchanged without a mask)."""
    return edited if mask is None else image + mask.to(edited) * (edited - image)


@dataclass(eq=False)
class RealEdit:
    """A real image's edit: its inversion, the reconstruction (the source row), the edits, timings."""

    inversion: Inversion
    reconstruction: Tensor  # (C, *S)
    edits: Tensor  # (E, C, *S), the input pasted back outside the mask when one was given
    psnr: float  # reconstruction against the input, dB
    seconds: dict


def edit_image(
    model: nn.Module,
    encoder,
    image: Tensor,
    source: str,
    edits: Sequence[str],
    p2p: PromptToPrompt | None,
    *,
    method: str,
    scheduler,
    steps: int,
    guidance: float,
    seed: int = 0,
    mask: Tensor | None = None,
    inner_steps: int = 10,
    null_tokens: str = "all",
) -> RealEdit:
    """Invert a real image under its caption, then edit it from the inverted noise (attnlab models).

    Args:
        model: a text-conditioned pixel-space attnlab model.
        encoder: its text encoder.
        image: (C, *S) in [-1, 1] at the model's size; source: its caption.
        edits: edited captions (may be empty: the reconstruction alone).
        p2p: the Prompt-to-Prompt settings (bound here); None with no edits.
        method: "ddim", "null-text" or "ddpm" (`attnlab.control.inversion.METHODS`).
        scheduler, steps, guidance: the sampler the edit runs with (its noise schedule is the model's).
        seed: ddpm's draw of x_t.
        mask: (1, *S) in {0, 1}: the edit may change only these pixels (blended into the source
            after every step, the input pasted back outside it at the end).
        inner_steps: null-text's optimiser iterations per step at most.
        null_tokens: what null-text optimises ("all": a token per caption position; "one": the
            null condition's one token; `TextDenoiser`).
    Returns:
        A RealEdit.
    """
    import time

    from attnlab.control.inversion import TextDenoiser, invert, psnr, replay

    for k, caption in enumerate([source, *edits]):
        check_caption(encoder, caption, "--prompt" if k == 0 else "--edit")
    device = next(model.parameters()).device
    x0 = image.to(device)[None]
    start = time.perf_counter()
    inv = invert(
        TextDenoiser(model, text_condition(encoder, [source], device), null_tokens), x0, method,
        scheduler=scheduler, steps=steps, guidance=guidance, seed=seed, inner_steps=inner_steps,
    )  # fmt: skip
    if method == "null-text":
        inv.info["null_tokens"] = null_tokens
    prompts = [source, *edits]
    plugins: list = []
    if edits:
        p2p.bind([encoder.tokens_of(p) for p in prompts], word_finder(encoder, prompts))
        plugins = [p2p, *([MaskBlend(mask[None])] if mask is not None else [])]
    mid = time.perf_counter()
    x = replay(model, text_condition(encoder, prompts, device), inv, plugins).cpu()
    end = time.perf_counter()
    out = paste(image[None], x[1:], None if mask is None else mask[None])
    seconds = {"inversion": inv.seconds, "sampling": end - mid, "total": end - start}
    return RealEdit(inv, x[0], out, psnr(x[0], image), seconds)
