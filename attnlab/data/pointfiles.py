"""Point-cloud files: reading the user's `.ply` / `.npy` clouds (plyfile), writing sample clouds as
binary PLY with their provenance in a header comment, and the two-view preview of a cloud
(matplotlib 3D scatter from a fixed camera, depth-cued, axes hidden)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch import Tensor

from attnlab.io import atomic_path

POINT_EXTS = (".ply", ".npy")
KEY = "attnlab"  # the header comment that carries the provenance: "comment attnlab {json}"
VIEWS = ((20.0, -60.0), (20.0, 30.0))  # (elevation, azimuth) in degrees of the two preview views


# Reading


def read_cloud(path: str | Path) -> np.ndarray:
    """(N, 3) float32 coordinates of a `.ply` (its vertex x, y, z) or `.npy` ((N, 3) or (3, N)) file.

    Raises:
        ValueError: the file holds no (N, 3) coordinates, or some are not finite (the message says
            which); plyfile and numpy raise their own errors for a corrupt file.
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        a = np.load(path, allow_pickle=False)
        if a.ndim == 2 and a.shape[0] == 3 and a.shape[1] != 3:
            a = a.T
        if a.ndim != 2 or a.shape[1] != 3:
            raise ValueError(f"expected an (N, 3) array of coordinates, got shape {a.shape}")
    else:
        from plyfile import PlyData

        ply = PlyData.read(str(path))
        if "vertex" not in ply:
            raise ValueError("no vertex element")
        v = ply["vertex"].data
        missing = [k for k in "xyz" if k not in v.dtype.names]
        if missing:
            raise ValueError(f"vertex element has no {', '.join(missing)} property")
        a = np.stack([v[k] for k in "xyz"], axis=1)
    a = a.astype(np.float32)
    bad = int((~np.isfinite(a)).any(axis=1).sum())
    if bad:
        raise ValueError(f"{bad} point(s) with NaN or infinite coordinates")
    return a


def fit_cloud(a: np.ndarray, size: int, seed: int) -> np.ndarray:
    """(size, 3): centred on its bounding box, scaled to a largest half-extent of 0.9 (as the
    built-in clouds), and `size` of its points drawn without replacement (seeded).

    Raises:
        ValueError: fewer than `size` points.
    """
    if len(a) < size:
        raise ValueError(f"{len(a)} points; data.size asks for {size}")
    a = a[np.sort(np.random.default_rng(seed).choice(len(a), size, replace=False))]
    a = a - (a.max(0) + a.min(0)) / 2
    extent = float(np.abs(a).max())
    return (a * (0.9 / extent if extent > 0 else 1.0)).astype(np.float32)


# Writing


def save_ply(path: str | Path, points: Tensor | np.ndarray, meta: dict) -> Path:
    """Write (3, N) or (N, 3) coordinates as a binary PLY, `meta` as JSON in a header comment."""
    from plyfile import PlyData, PlyElement

    a = _as_n3(points)
    v = np.empty(len(a), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    v["x"], v["y"], v["z"] = a[:, 0], a[:, 1], a[:, 2]
    ply = PlyData(
        [PlyElement.describe(v, "vertex")], comments=[f"{KEY} {json.dumps(meta, separators=(',', ':'))}"]
    )
    with atomic_path(path) as tmp:
        ply.write(str(tmp))
    return Path(path)


def ply_provenance(path: str | Path) -> str | None:
    """The provenance JSON text of a PLY written by `save_ply`, or None."""
    from plyfile import PlyData, PlyParseError

    try:
        with open(path, "rb") as f:
            ply = PlyData.read(f)
    except PlyParseError as e:
        raise ValueError(f"not a PLY file ({e})") from None
    for c in ply.comments:
        if c.startswith(KEY + " "):
            return c[len(KEY) + 1 :]
    return None


def _as_n3(points) -> np.ndarray:
    a = points.detach().float().cpu().numpy() if isinstance(points, Tensor) else np.asarray(points)
    return a.T if a.shape[0] == 3 and a.shape[-1] != 3 else a


# Preview


def preview(points, title: str | None = None, px: int = 200, values=None) -> np.ndarray:
    """(H, 2 * H, 3) uint8 image of a cloud from the two fixed VIEWS side by side: a 3D scatter in
    the cube [-1, 1]^3, nearer points larger and darker (depth cueing over the cloud's depth range),
    axes hidden. `values` (N,) in [0, 1], one per point (a heat map), colour the points instead of
    their depth (jet, as the image overlays); nearer points are still drawn larger."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    a = _as_n3(points)
    heat = None if values is None else _as_values(values, len(a))
    fig = Figure(figsize=(4.0, 2.0), dpi=px / 2.0)
    for k, (elev, azim) in enumerate(VIEWS):
        ax = fig.add_subplot(1, 2, k + 1, projection="3d")
        depth = _depth(a, elev, azim)  # 0 nearest, 1 farthest
        order = np.argsort(-depth)  # far points first, near ones drawn over them
        ax.scatter(
            a[order, 0],
            a[order, 1],
            a[order, 2],
            c=depth[order] if heat is None else heat[order],
            cmap="viridis" if heat is None else "jet",
            vmin=0.0,
            vmax=1.0,
            s=2.5 * (1.6 - depth[order]),
            depthshade=False,
            linewidths=0,
        )
        ax.view_init(elev=elev, azim=azim)
        for lim in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
            lim(-1, 1)
        ax.set_box_aspect((1, 1, 1), zoom=1.45)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=6)
    fig.subplots_adjust(0, 0, 1, 0.92 if title else 1, 0, 0)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _as_values(values, n: int) -> np.ndarray:
    v = values.detach().float().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values, float)
    if v.shape != (n,):
        raise ValueError(f"preview: {v.shape} values for a cloud of {n} points; expected one per point")
    return v


def _depth(a: np.ndarray, elev: float, azim: float) -> np.ndarray:
    """Each point's distance along the camera's viewing direction, scaled to [0, 1] over the cloud."""
    e, z = np.radians(elev), np.radians(azim)
    toward_camera = np.array([np.cos(e) * np.cos(z), np.cos(e) * np.sin(z), np.sin(e)])
    d = -(a @ toward_camera)  # larger = farther from the camera
    return (d - d.min()) / max(float(np.ptp(d)), 1e-6)
