"""CLIP score (Hessel et al., 2021): how well each generated image matches its prompt, from a local CLIP.

    scorer = load_clip("models/clip-vit-large-patch14")   # a CLIPModel + CLIPProcessor save_pretrained folder
    scorer.score(images, prompts)                          # (N,) 100 * max(cos(E_image, E_text), 0)
    scorer.mean_score(images, prompts)                     # their mean, the number papers report

Images are (N, 3, H, W) (or (N, 1, H, W)) floats in [-1, 1], attnlab's convention. They are quantised
to uint8, as a saved PNG would be, and handed to the folder's own image processor (resize, centre crop,
CLIP normalisation), so the score is the one the usual "save the samples, run CLIP score" recipe gives.

Which path computes it. torchmetrics' `clip_score` is tried first, with a callable returning the
locally loaded model and processor (its `model_name_or_path` accepts one), so nothing is downloaded.
torchmetrics 1.9 expects `CLIPModel.get_image_features` to return a tensor; from transformers 5 it
returns a `BaseModelOutputWithPooling` (the projected embedding in `pooler_output`), and torchmetrics
fails with "'BaseModelOutputWithPooling' object has no attribute 'norm'". The first batch detects
this (one try, caught) and the scorer then computes the same definition directly with transformers:
`get_image_features` / `get_text_features`, taking `pooler_output` where the result is not a tensor.
With transformers 5.x (5.24 here) the direct path is the one that runs; `ClipScorer.backend` says which
ran and `ClipScorer.fallback_reason` why. The two paths differ only for captions longer than the text
encoder's context: the direct path truncates with the tokenizer (keeping the EOS token the embedding
is read from); torchmetrics cuts the token ids.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.integrations.diffusers.load import PICKLED, check_device, offline

SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
EXPECTED = "a CLIP folder written by CLIPModel and CLIPProcessor save_pretrained"


# The folder


def check_folder(folder: str | Path) -> Path:
    """`folder` as a Path, once it holds a CLIP config, safetensors weights, a tokenizer and an image processor.

    Raises:
        ConfigError: naming the folder and the file or key at fault.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"CLIP folder {folder}: not found; expected {EXPECTED}")
    _check_config(folder)
    _check_weights(folder)
    _check_preprocessing(folder)
    return folder


def _check_config(folder: Path) -> None:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"CLIP folder {folder}: no config.json; expected {EXPECTED}")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ConfigError(f"CLIP folder {folder}: config.json is not a JSON object") from None
    if model_type != "clip":
        raise ConfigError(
            f'CLIP folder {folder}: config.json has model_type={model_type!r}; expected "clip" (a CLIPModel)'
        )


def _check_weights(folder: Path) -> None:
    if any((folder / name).is_file() for name in SAFETENSORS):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED)
    if pickled:
        raise ConfigError(
            f"CLIP folder {folder}: its weights are pickled ({pickled[0]}), which can run code when loaded; "
            "expected model.safetensors (re-save the model with save_pretrained(safe_serialization=True))"
        )
    raise ConfigError(f"CLIP folder {folder}: no model.safetensors; expected {EXPECTED}")


def _check_preprocessing(folder: Path) -> None:
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        raise ConfigError(
            f"CLIP folder {folder}: no image processor ({' or '.join(PROCESSOR_FILES)}); expected {EXPECTED}"
        )
    if not any(all((folder / name).is_file() for name in names) for names in TOKENIZER_FILES):
        raise ConfigError(
            f"CLIP folder {folder}: no tokenizer (tokenizer.json, or vocab.json and merges.txt); expected {EXPECTED}"
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No loading bar or backend notices from transformers for the block (the caller reports its own errors)."""
    from transformers.utils import logging as tl

    bar, level = tl.is_progress_bar_enabled(), tl.get_verbosity()
    tl.disable_progress_bar()
    tl.set_verbosity_error()
    try:
        yield
    finally:
        tl.set_verbosity(level)
        if bar:
            tl.enable_progress_bar()


def load_clip(folder: str | Path, device: str | torch.device = "cpu") -> ClipScorer:
    """A CLIP scorer from a local folder: safetensors weights only, local files only, nothing downloaded.

    Args:
        folder: a folder written by `CLIPModel.save_pretrained` and `CLIPProcessor.save_pretrained`
            (config.json with model_type "clip", model.safetensors, tokenizer and image processor files).
        device: where the model runs (cpu, cuda, cuda:N).
    Returns:
        A `ClipScorer`, its model in eval mode without gradients.
    Raises:
        ConfigError: a missing folder, a config that is not CLIP's, pickled-only weights, missing
            tokenizer or processor files, or files transformers cannot load.
    """
    from transformers import CLIPModel, CLIPProcessor

    folder = check_folder(folder)
    dev = check_device(str(device))
    try:
        with offline(), _quiet():
            model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
            processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"CLIP folder {folder}: transformers cannot load it ({first})") from None
    return ClipScorer(model.eval().requires_grad_(False).to(dev), processor)


# The score


def to_uint8(images: Tensor) -> Tensor:
    """(N, 3 or 1, H, W) images in [-1, 1] -> (N, 3, H, W) uint8 on the CPU, as they would be saved."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ConfigError(f"CLIP score images must be (N, 3, H, W) or (N, 1, H, W) in [-1, 1], got {shape}")
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _texts(texts: str | Sequence[str], n: int) -> list[str]:
    texts = [texts] * n if isinstance(texts, str) else list(texts)
    if len(texts) != n:
        raise ConfigError(f"CLIP score needs one text per image, got {len(texts)} texts for {n} images")
    return texts


def _embedding(out) -> Tensor:
    # transformers < 5 returns the projected embedding; 5.x wraps it in BaseModelOutputWithPooling.
    emb = out if isinstance(out, Tensor) else out.pooler_output
    if not isinstance(emb, Tensor):
        raise TypeError(f"CLIP features: expected a tensor, got {type(emb).__name__}")
    return emb.float()


class ClipScorer:
    """A local CLIP model and its processor, scoring images against the texts that prompted them."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.backend: str | None = None  # "torchmetrics" or "transformers", settled by the first batch
        self.fallback_reason: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score(self, images: Tensor, texts: str | Sequence[str], batch_size: int = 32) -> Tensor:
        """Per-image CLIP score, 100 * max(cos(E_image, E_text), 0), in [0, 100].

        Args:
            images: (N, 3, H, W) or (N, 1, H, W) floats in [-1, 1] (attnlab's convention; not [0, 1]).
            texts: one text per image, or one text for all of them.
            batch_size: images per model call; the scores do not depend on it.
        Returns:
            (N,) float32 scores on the model's device.
        Raises:
            ConfigError: images of the wrong shape, or a text count that is not the image count.
        """
        pixels = to_uint8(images)
        texts = _texts(texts, len(pixels))
        chunks = [
            self._batch(pixels[i : i + batch_size], texts[i : i + batch_size])
            for i in range(0, len(pixels), batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.zeros(0, device=self.device)

    def mean_score(self, images: Tensor, texts: str | Sequence[str], batch_size: int = 32) -> float:
        """The mean of `score` over the images. torchmetrics' `CLIPScore` clamps the mean of the cosines
        rather than each one; the two agree whenever no cosine is negative."""
        return self.score(images, texts, batch_size).mean().item()

    def _batch(self, pixels: Tensor, texts: list[str]) -> Tensor:
        if self.backend != "transformers":
            try:
                out = self._torchmetrics(pixels, texts)
                self.backend = "torchmetrics"
                return out
            except (AttributeError, TypeError) as e:
                if self.backend == "torchmetrics":
                    raise
                self.backend, self.fallback_reason = (
                    "transformers",
                    f"torchmetrics failed: {type(e).__name__}: {e}",
                )
        return self._direct(pixels, texts)

    def _torchmetrics(self, pixels: Tensor, texts: list[str]) -> Tensor:
        from torchmetrics.functional.multimodal import clip_score

        # Its functional form returns the batch mean, so each image is its own call to keep per-image scores;
        # the images go on the model's device because torchmetrics moves the model to theirs.
        local = lambda: (self.model, self.processor)  # noqa: E731
        dev = self.device
        return torch.stack([clip_score(p.to(dev), [t], local).float() for p, t in zip(pixels, texts)])

    def _direct(self, pixels: Tensor, texts: list[str]) -> Tensor:
        dev, dtype = self.device, self.model.dtype
        pix = self.processor(images=list(pixels), return_tensors="pt")["pixel_values"].to(dev, dtype)
        context = self.model.config.text_config.max_position_embeddings
        tok = self.processor(
            text=texts, return_tensors="pt", padding=True, truncation=True, max_length=context
        )
        img = _embedding(self.model.get_image_features(pixel_values=pix))  # (B, projection_dim)
        txt = _embedding(
            self.model.get_text_features(
                input_ids=tok["input_ids"].to(dev), attention_mask=tok["attention_mask"].to(dev)
            )
        )
        cos = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)  # (B,)
        return 100 * cos.clamp(min=0)
