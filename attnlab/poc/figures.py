"""Figures of a PoC report (matplotlib, written atomically): quality versus cost, loss curves, the
samples of every variant side by side, and per-variant sample grids."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from attnlab.io import atomic_path
from attnlab.poc.metrics import Metric, Stat
from attnlab.samples import grid, to_uint8

LEVEL_COLORS = {0: "0.35", 1: "tab:blue", 2: "tab:orange", 3: "tab:green", 4: "tab:purple", 5: "tab:red"}


def _save(fig: Figure, path: Path, dpi: int = 110) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def _axis(m: Metric) -> tuple[float, str]:
    """Plot scale and unit of a metric: latency in ms, rates in %, the rest as they are."""
    if m.key == "latency_s":
        return 1000.0, " (ms)"
    if m.family == "alignment" and not m.lower_is_better:
        return 100.0, " (%)"
    return 1.0, ""


def _scatter(ax, points: Sequence[dict], x: Metric, y: Metric) -> None:
    """One point per variant with seed-spread error bars (and a dot per training seed when there are
    several), coloured by level, labelled by name."""
    (kx, ux), (ky, uy) = _axis(x), _axis(y)
    xy = [(kx * p[x.key].mean, ky * p[y.key].mean) for p in points]
    for p, offset in zip(points, _label_offsets(xy)):
        sx, sy = p[x.key], p[y.key]
        color = LEVEL_COLORS[p["group"]]
        ax.errorbar(
            kx * sx.mean,
            ky * sy.mean,
            xerr=kx * sx.std,
            yerr=ky * sy.std,
            fmt="o",
            color=color,
            capsize=3,
            ms=7,
        )
        if sx.train_seeds > 1 and sy.train_seeds > 1 and len(sx.values) == len(sy.values):
            # one dot per training seed (its mean over the sampling seeds): the spread a new training run brings
            ax.scatter(
                kx * np.array(sx.values), ky * np.array(sy.values), s=16, color=color, alpha=0.45, lw=0
            )
        ax.annotate(
            p["name"], (kx * sx.mean, ky * sy.mean), textcoords="offset points", xytext=offset, fontsize=8
        )
    ax.set_xlabel(f"{x.label}{ux}, {'lower' if x.lower_is_better else 'higher'} is better", fontsize=9)
    ax.set_ylabel(f"{y.label}{uy}, {'lower' if y.lower_is_better else 'higher'} is better", fontsize=9)
    ax.grid(alpha=0.3)


def _label_offsets(xy: Sequence[tuple[float, float]]) -> list[tuple[int, int]]:
    """Text offsets (points) for labels: points close to an earlier one take the next free slot,
    so labels of near-equal variants do not print over each other."""
    slots = [(6, 5), (6, -11), (6, 15), (6, -21), (6, 25), (6, -31)]
    if not xy:
        return []
    a = np.array(xy, dtype=float)
    span = np.maximum(a.max(0) - a.min(0), 1e-12)
    out: list[tuple[int, int]] = []
    for i, p in enumerate(a):
        near = [out[j] for j in range(i) if (np.abs((a[j] - p) / span) < 0.06).all()]
        out.append(next((s for s in slots if s not in near), slots[0]))
    return out


def quality_vs_cost(path: Path, points: Sequence[dict], cost: Metric, panels: Sequence[Metric]) -> Path:
    """Each panel: a quality or alignment metric (y) against the cost metric (x), one point per variant.

    Args:
        points: per variant {"name", "group" (level 0-5), metric key -> Stat}.
    """
    fig = Figure(figsize=(5.6 * len(panels), 4.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, y in zip(axes, panels):
        _scatter(ax, [p for p in points if p.get(y.key) and p.get(cost.key)], cost, y)
        ax.set_title(f"{y.label} vs {cost.label}", fontsize=10)
    handles = sorted({p["group"] for p in points})
    for g in handles:
        axes[-1].plot([], [], "o", color=LEVEL_COLORS[g], label="reference / none" if g == 0 else f"L{g}")
    axes[-1].legend(fontsize=8, loc="best", title="level", title_fontsize=8)
    return _save(fig, path)


def loss_curves(path: Path, logs: Mapping[str, Sequence[dict]]) -> Path:
    """Training loss per trained model: the logged windows and a smoothed line."""
    fig = Figure(figsize=(7.5, 3.6))
    ax = fig.subplots()
    for i, (name, records) in enumerate(logs.items()):
        steps = np.array([r["step"] for r in records])
        loss = np.array([r["loss"] for r in records])
        color = f"C{i}"
        if len(steps) < 30:  # few logging windows: the line itself, no smoothing to lag behind it
            ax.plot(steps, loss, color=color, lw=2, label=name, marker="o" if len(steps) < 3 else None)
            continue
        ax.plot(steps, loss, color=color, alpha=0.25, lw=1)
        ax.plot(steps, _smooth(loss), color=color, lw=2, label=name)
    ax.set_xlabel("training step", fontsize=9)
    ax.set_ylabel("loss (per logging window)", fontsize=9)
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _smooth(v: np.ndarray, weight: float = 0.8) -> np.ndarray:
    """Exponential moving average, debiased (divided by 1 - weight^t) so it starts on the data."""
    out, acc = np.empty(len(v)), 0.0
    for i, x in enumerate(v):
        acc = weight * acc + (1 - weight) * float(x)
        out[i] = acc / (1 - weight ** (i + 1))
    return out


def side_by_side(
    path: Path,
    samples: Mapping[str, Tensor],
    prompts: Sequence[str],
    columns: int = 8,
    sample_rate: int | None = None,
) -> Path:
    """Rows = variants, columns = the first prompts; every variant drew these with the same noise."""
    n = min(columns, len(prompts), *(len(x) for x in samples.values()))
    audio = next(iter(samples.values())).dim() == 3
    cell = (1.9, 1.3) if audio else (1.25, 1.25)
    fig = Figure(figsize=(1.6 + cell[0] * n, 0.7 + cell[1] * len(samples)))
    axes = fig.subplots(len(samples), n, squeeze=False)
    for r, (name, x) in enumerate(samples.items()):
        for c in range(n):
            ax = axes[r, c]
            _spectrogram(ax, x[c], sample_rate) if audio else ax.imshow(_rgb(x[c]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("\n".join(textwrap.wrap(prompts[c], 16)[:3]), fontsize=6.5)
            if c == 0:
                ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fig.subplots_adjust(wspace=0.05, hspace=0.08)
    return _save(fig, path)


def _rgb(x: Tensor) -> np.ndarray:
    a = to_uint8(x)
    return np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a


def _spectrogram(ax, wave: Tensor, sample_rate: int | None) -> None:
    sr = sample_rate or 8000
    ax.specgram(wave.reshape(-1).float().numpy(), NFFT=256, Fs=sr, noverlap=192, cmap="magma")
    ax.set_ylim(0, min(sr / 2, 2500))


def sample_grid(
    path: Path, x: Tensor, columns: int = 8, scale: int | None = None, sample_rate: int | None = None
) -> Path:
    """A grid of one variant's samples (images upscaled with nearest neighbours; audio as spectrograms)."""
    if x.dim() == 3:
        return _audio_grid(path, x, columns, sample_rate)
    rows = -(-len(x) // columns)
    scale = scale or max(1, 128 // x.shape[-1])
    img = Image.fromarray(grid(x, rows))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def _audio_grid(path: Path, x: Tensor, columns: int, sample_rate: int | None) -> Path:
    cols = min(columns, len(x))
    rows = -(-len(x) // cols)
    fig = Figure(figsize=(1.6 * cols, 1.1 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(x):
            _spectrogram(ax, x[i], sample_rate)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("on" if i < len(x) else "off")
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    return _save(fig, path, dpi=80)


def points_of(variants: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """The plot points of `variants` (results.json entries) for metric `keys`."""
    out = []
    for v in variants:
        p = {"name": v["name"], "group": v["group"]}
        for k in keys:
            s = v["metrics"].get(k)
            p[k] = Stat.from_dict(s) if s else None
        out.append(p)
    return out
