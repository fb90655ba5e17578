"""Figures for heat maps and edits: overlays on images, curves over waveforms, coloured point clouds,
side-by-side rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from attnlab.io import atomic_path

PANEL = 2.2  # inches per image panel


def _image(x: Tensor) -> tuple[np.ndarray, str | None]:
    """(C, H, W) in [-1, 1] -> an array imshow takes, and its colour map."""
    a = ((x.detach().float().clamp(-1, 1) + 1) / 2).cpu().numpy()
    return (a[0], "gray") if a.shape[0] == 1 else (a.transpose(1, 2, 0), None)


def _save(fig: Figure, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return Path(path)


def _show(ax, x: Tensor, title: str, heat: Tensor | None = None) -> None:
    img, cmap = _image(x)
    ax.imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    if heat is not None:
        ax.imshow(
            heat.detach().float().cpu().numpy(),
            cmap="jet",
            alpha=0.5,
            vmin=0,
            vmax=1,
            interpolation="bilinear",
        )
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def heat_overlays(path: str | Path, x: Tensor, maps: Mapping[str, Tensor], prompt: str = "") -> Path:
    """One row: the image, then its heat map per word laid over it. x: (C, H, W); maps: word -> (H, W)."""
    n = 1 + len(maps)
    fig = Figure(figsize=(PANEL * n, PANEL + 0.4))
    axes = fig.subplots(1, n, squeeze=False)[0]
    _show(axes[0], x, "sample")
    for ax, (word, m) in zip(axes[1:], maps.items()):
        _show(ax, x, word, m)
    if prompt:
        fig.suptitle(prompt, fontsize=10)
    return _save(fig, path)


def heat_curves(
    path: str | Path, wave: Tensor, maps: Mapping[str, Tensor], sample_rate: int, prompt: str = ""
) -> Path:
    """The waveform (1, T) and, below it, each word's heat curve over time. maps: word -> (T,)."""
    t = np.arange(wave.shape[-1]) / sample_rate
    fig = Figure(figsize=(8, 2 + 1.2 * len(maps)))
    axes = fig.subplots(1 + len(maps), 1, sharex=True, squeeze=False)[:, 0]
    axes[0].plot(t, wave.detach().float().reshape(-1).cpu().numpy(), lw=0.6, color="0.2")
    axes[0].set_ylabel("sample")
    for ax, (word, m) in zip(axes[1:], maps.items()):
        ax.fill_between(t, m.detach().float().cpu().numpy(), color="tab:red", alpha=0.6)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(word, rotation=0, ha="right")
    axes[-1].set_xlabel("time (s)")
    if prompt:
        fig.suptitle(prompt, fontsize=10)
    return _save(fig, path)


def heat_clouds(path: str | Path, cloud: Tensor, maps: Mapping[str, Tensor], prompt: str = "") -> Path:
    """The cloud (3, N) in its two-view preview, and below it the same views coloured by each word's
    per-point map (jet, as the image overlays). maps: word -> (N,) in [0, 1]."""
    from attnlab.data.pointfiles import preview

    panels = [("sample", preview(cloud, px=320))]
    panels += [(w, preview(cloud, px=320, values=m)) for w, m in maps.items()]
    fig = Figure(figsize=(2 * PANEL, (PANEL / 2 + 0.3) * len(panels)))
    for ax, (title, img) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        ax.imshow(img)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    if prompt:
        fig.suptitle(prompt, fontsize=10)
    return _save(fig, path)


def side_by_side(path: str | Path, images: Sequence[Tensor], titles: Sequence[str]) -> Path:
    """Images (C, H, W) in one row with a title each (source first, then the edits)."""
    fig = Figure(figsize=(PANEL * len(images), PANEL + 0.4))
    for ax, x, title in zip(fig.subplots(1, len(images), squeeze=False)[0], images, titles):
        _show(ax, x, title)
    return _save(fig, path)


def waves_side_by_side(
    path: str | Path, waves: Sequence[Tensor], titles: Sequence[str], sample_rate: int
) -> Path:
    """Waveforms (1, T) stacked, one per prompt (source first)."""
    fig = Figure(figsize=(8, 1.4 * len(waves)))
    axes = fig.subplots(len(waves), 1, sharex=True, squeeze=False)[:, 0]
    for ax, w, title in zip(axes, waves, titles):
        ax.plot(np.arange(w.shape[-1]) / sample_rate, w.detach().float().reshape(-1).cpu().numpy(), lw=0.6)
        ax.set_title(title, fontsize=9, loc="left")
    axes[-1].set_xlabel("time (s)")
    return _save(fig, path)
