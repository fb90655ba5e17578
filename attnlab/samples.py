"""Sample files that carry their own provenance: PNG text chunks, WAV INFO comments, grids.

The provenance (model directory, weights hash, sampler, seed, techniques) is enough to draw a sample
again alone (see `attnlab.generate.regenerate`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

import attnlab
from attnlab.errors import AttnlabError, DataError
from attnlab.io import atomic_path

KEY = "attnlab"  # the PNG text key / the JSON in a WAV comment
WAV_COMMENT_MAX = 2000  # libsndfile keeps INFO strings up to about 2 KB


# Provenance


def provenance_base(
    ckpt: Path,
    weights: Path,
    cfg,
    sampler: str,
    steps: int,
    guidance: float,
    techniques: dict,
    precision: str = "fp32",
) -> dict:
    """What every sample of one run of `sample` shares (the precision it was computed in, too:
    `regenerate` draws a bf16 sample in bf16 again)."""
    from attnlab.train.checkpoint import file_sha256

    return {
        "attnlab": attnlab.__version__,
        "model_dir": str(ckpt.resolve()),
        "weights": weights.name,
        "weights_sha256": file_sha256(weights),
        "sampler": sampler,
        "steps": steps,
        "guidance": guidance,
        "prediction": cfg.diffusion.prediction,
        "techniques": techniques,
        "precision": precision,
    }


def model_techniques(cfg) -> dict:
    """The architectural techniques (L1-L4) the model was trained with."""
    return {"model": dict(cfg.model.techniques)}


def write_samples(out: Path, x, items: list, base: dict, cfg, grid_rows: int) -> list[str]:
    """One file per sample with its provenance, plus a grid for images; returns the file names."""
    names = []
    for i, (xi, it) in enumerate(zip(x, items)):
        meta = {**base, "prompt": it.prompt, "label": it.label, "seed": it.seed}
        stem = f"{i:03d}-{slug(_describe(it))}-seed{it.seed}"
        if cfg.model.backbone == "points":
            names.extend(save_points(out, stem, xi, meta, _describe(it)))
        elif cfg.model.dims == 1:
            save_wav(out / f"{stem}.wav", xi, cfg.data.sample_rate, meta)
            names.append(f"{stem}.wav")
        else:
            save_png(out / f"{stem}.png", xi, meta)
            names.append(f"{stem}.png")
    if cfg.model.dims == 2:
        scale = max(1, 64 // cfg.model.size)  # small images are shown at least 64 px wide
        save_array_png(
            out / "grid.png", grid(x, grid_rows), {**base, "items": [vars(it) for it in items]}, scale
        )
    return names


def save_points(out: Path, stem: str, x: Tensor, meta: dict, title: str) -> list[str]:
    """A point cloud (3, N) as `stem.ply` (provenance in its header) and its two-view `stem.png`
    preview (provenance in its text chunk); returns the two names."""
    from attnlab.data.pointfiles import preview, save_ply

    save_ply(out / f"{stem}.ply", x, meta)
    save_array_png(out / f"{stem}.png", preview(x, title), meta)
    return [f"{stem}.ply", f"{stem}.png"]


def _describe(item) -> str:
    if item.prompt is not None:
        return item.prompt
    return f"label-{item.label}" if item.label is not None else "uncond"


# Files


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "sample"


def to_uint8(x: Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, C) or (H, W) uint8."""
    a = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


def save_png(path: str | Path, x: Tensor, meta: dict, scale: int = 1) -> Path:
    """Write image (C, H, W) in [-1, 1] as PNG with `meta` as JSON in the `attnlab` text chunk."""
    return save_array_png(path, to_uint8(x), meta, scale)


def save_array_png(path, a: np.ndarray, meta: dict, scale: int = 1) -> Path:
    img = Image.fromarray(a)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    info = PngInfo()
    info.add_text(KEY, json.dumps(meta, separators=(",", ":")))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def save_wav(path: str | Path, x: Tensor, sample_rate: int, meta: dict) -> Path:
    """Write audio (1, T) in [-1, 1] as 16-bit WAV with `meta` as JSON in its INFO comment."""
    text = json.dumps(meta, separators=(",", ":"))
    if len(text) > WAV_COMMENT_MAX:
        raise AttnlabError(
            f"{path}: provenance is {len(text)} characters; a WAV comment holds {WAV_COMMENT_MAX}"
        )
    with atomic_path(path) as tmp:
        with sf.SoundFile(tmp, "w", samplerate=sample_rate, channels=1, subtype="PCM_16", format="WAV") as f:
            f.comment = text
            f.write(x.float().clamp(-1, 1).reshape(-1).numpy())
    return Path(path)


def read_provenance(path: str | Path) -> dict:
    """The provenance dict of a sample file written by attnlab (PNG or WAV).

    Raises:
        DataError: the file is unreadable, carries no provenance, or its provenance is not a JSON object.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".wav":
            with sf.SoundFile(path) as f:
                text = f.comment
        elif path.suffix.lower() == ".ply":
            from attnlab.data.pointfiles import ply_provenance

            text = ply_provenance(path)
        else:
            with Image.open(path) as img:
                text = img.info.get(KEY)  # PNG text chunks; other formats carry none
    except (OSError, RuntimeError, ValueError, sf.LibsndfileError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if not text:
        raise DataError(f"{path}: carries no attnlab provenance")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        raise DataError(f"{path}: its provenance is not valid JSON") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: its provenance is not a JSON object")
    return meta


# What `regenerate` needs from one sample's provenance, with the types it must have.
SAMPLE_FIELDS = {
    "model_dir": str,
    "weights": str,
    "weights_sha256": str,
    "sampler": str,
    "steps": int,
    "guidance": (int, float),
    "seed": int,
    "prompt": (str, type(None)),
    "label": (int, type(None)),
}


def read_sample_provenance(path: str | Path) -> dict:
    """The provenance of one sample (not a grid), with every field `regenerate` reads checked.

    Raises:
        DataError: naming the missing or damaged fields.
    """
    meta = read_provenance(path)
    missing = [k for k in SAMPLE_FIELDS if k not in meta]
    if missing:
        what = "a grid, not one sample" if "items" in meta else "damaged"
        raise DataError(f"{path}: its provenance has no {', '.join(missing)} ({what}); cannot draw it again")
    fields = {**SAMPLE_FIELDS, "techniques": dict} if "techniques" in meta else SAMPLE_FIELDS
    bad = [
        f"{k}={meta[k]!r}"
        for k, kind in fields.items()
        if not isinstance(meta[k], kind) or (kind is int and isinstance(meta[k], bool))
    ]
    if "precision" in meta and meta["precision"] not in ("fp32", "bf16", "fp16"):
        bad.append(f"precision={meta['precision']!r}")
    if bad:
        raise DataError(f"{path}: its provenance is damaged ({', '.join(bad)}); cannot draw it again")
    return meta


def read_png(path: str | Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img).copy()


def grid(x: Tensor, rows: int, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) images -> one uint8 image with `rows` rows, separated by `pad` grey pixels."""
    n, c, h, w = x.shape
    cols = -(-n // rows)
    canvas = torch.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), -0.5)
    for i in range(n):
        r, k = divmod(i, cols)
        canvas[
            :, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w
        ] = x[i]
    return to_uint8(canvas)
