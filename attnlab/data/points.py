"""`points`: procedural 3D point clouds of one or two solids, captioned with shape and relation.

Each solid (sphere, cube, torus, cone, cylinder, pyramid) is sampled uniformly over its surface
(area-weighted faces, rejection on the torus), stretched along the vertical axis (aspect), turned
about it, scaled and placed. Axes: x to the right, y away from the viewer, z up. Two solids stand
side by side ("a cone left of a sphere") or one on top of the other ("a cube above a torus"), each
with half of the points. label = shape index of the first solid.

Train and eval never share a cloud: the first solid's turn is an even multiple of 1/720 of a turn in
train and an odd one in eval.
"""

from __future__ import annotations

import numpy as np
import torch

from attnlab.data.base import Bundle, MemoryDataset, Split, item_rng

SHAPES_3D = ("sphere", "cube", "torus", "cone", "cylinder", "pyramid")
RELATIONS_3D = ("left of", "right of", "above", "below")
POINT_SIZES = (64, 4096)  # inclusive range of points per cloud
_STREAM = 4
_TURNS = 720  # quantisation of the turn about z (its parity separates the splits)
_OFFSET = 0.5  # centre distance of a pair's solids from the cloud centre


# Surfaces of the canonical solids (inside [-0.8, 0.8]^3 before scaling)


def _sphere(rng: np.random.Generator, n: int) -> np.ndarray:
    p = rng.standard_normal((n, 3))
    return 0.8 * p / np.linalg.norm(p, axis=1, keepdims=True)


def _cube(rng: np.random.Generator, n: int) -> np.ndarray:
    p = rng.uniform(-0.8, 0.8, (n, 3))
    axis, sign = rng.integers(3, size=n), rng.choice((-0.8, 0.8), size=n)
    p[np.arange(n), axis] = sign  # every face has the same area
    return p


def _torus(rng: np.random.Generator, n: int, big: float = 0.55, small: float = 0.25) -> np.ndarray:
    """Uniform on the surface: the tube angle phi is drawn with density ~ (R + r cos phi)."""
    out = np.empty((0, 3))
    while len(out) < n:
        theta, phi = rng.uniform(0, 2 * np.pi, (2, 2 * n))
        keep = rng.uniform(0, big + small, 2 * n) < big + small * np.cos(phi)
        theta, phi = theta[keep], phi[keep]
        ring = big + small * np.cos(phi)
        out = np.concatenate(
            [out, np.stack([ring * np.cos(theta), ring * np.sin(theta), small * np.sin(phi)], 1)]
        )
    return out[:n]


def _disc(rng: np.random.Generator, n: int, radius: float, z: float) -> np.ndarray:
    r, a = radius * np.sqrt(rng.uniform(0, 1, n)), rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(a), r * np.sin(a), np.full(n, z)], 1)


def _cylinder(rng: np.random.Generator, n: int, radius: float = 0.6, half: float = 0.8) -> np.ndarray:
    areas = np.array([2 * np.pi * radius * 2 * half, np.pi * radius**2, np.pi * radius**2])
    part = rng.choice(3, size=n, p=areas / areas.sum())
    a, z = rng.uniform(0, 2 * np.pi, n), rng.uniform(-half, half, n)
    side = np.stack([radius * np.cos(a), radius * np.sin(a), z], 1)
    top, bottom = _disc(rng, n, radius, half), _disc(rng, n, radius, -half)
    return np.where((part == 0)[:, None], side, np.where((part == 1)[:, None], top, bottom))


def _cone(rng: np.random.Generator, n: int, radius: float = 0.8, half: float = 0.8) -> np.ndarray:
    slant = np.hypot(radius, 2 * half)
    areas = np.array([np.pi * radius * slant, np.pi * radius**2])
    side = rng.uniform(0, 1, n) < areas[0] / areas.sum()
    f, a = np.sqrt(rng.uniform(0, 1, n)), rng.uniform(0, 2 * np.pi, n)  # f: distance from the apex / slant
    mantle = np.stack([f * radius * np.cos(a), f * radius * np.sin(a), half - 2 * half * f], 1)
    return np.where(side[:, None], mantle, _disc(rng, n, radius, -half))


def _triangles(rng: np.random.Generator, n: int, tris: np.ndarray) -> np.ndarray:
    """Uniform over a union of triangles (T, 3, 3): a triangle by area, then the square-root trick."""
    areas = 0.5 * np.linalg.norm(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]), axis=1)
    t = tris[rng.choice(len(tris), size=n, p=areas / areas.sum())]
    u, v = np.sqrt(rng.uniform(0, 1, n))[:, None], rng.uniform(0, 1, n)[:, None]
    return (1 - u) * t[:, 0] + u * (1 - v) * t[:, 1] + u * v * t[:, 2]


def _pyramid(rng: np.random.Generator, n: int, half: float = 0.8) -> np.ndarray:
    c = np.array([[-half, -half, -half], [half, -half, -half], [half, half, -half], [-half, half, -half]])
    apex = np.array([0.0, 0.0, half])
    sides = [np.stack([c[i], c[(i + 1) % 4], apex]) for i in range(4)]
    base = [np.stack([c[0], c[1], c[2]]), np.stack([c[0], c[2], c[3]])]
    return _triangles(rng, n, np.stack(sides + base))


SURFACES = {
    "sphere": _sphere,
    "cube": _cube,
    "torus": _torus,
    "cone": _cone,
    "cylinder": _cylinder,
    "pyramid": _pyramid,
}


# Scenes


def sample_solid(rng: np.random.Generator, n_objects: int, parity: int | None) -> dict:
    """One solid's attributes; `parity` fixes the parity of its turn (None: any turn)."""
    k = int(rng.integers(_TURNS // 2)) * 2 + parity if parity is not None else int(rng.integers(_TURNS))
    lo, hi = (0.55, 0.9) if n_objects == 1 else (0.32, 0.45)
    return {
        "shape": SHAPES_3D[int(rng.integers(len(SHAPES_3D)))],
        "scale": float(rng.uniform(lo, hi)),
        "aspect": float(rng.uniform(0.75, 1.3)),
        "rotation": 2 * np.pi * k / _TURNS,
    }


def sample_cloud(rng: np.random.Generator, n_points: int, objects: tuple[int, int], parity: int) -> tuple:
    """One cloud of `objects` = (fewest, most) solids: (n_points, 3) float32 points, (n_points,)
    object ids, the solids (caption order) with their centres, the relation (None for one solid)
    and the caption."""
    count = int(rng.integers(objects[0], objects[1] + 1))
    solids = [sample_solid(rng, count, parity if i == 0 else None) for i in range(count)]
    relation = RELATIONS_3D[int(rng.integers(len(RELATIONS_3D)))] if count == 2 else None
    for solid, centre in zip(solids, _centres(rng, relation)):
        solid["center"] = centre
    sizes = [n_points // count + (i < n_points % count) for i in range(count)]
    points = np.concatenate([_place(SURFACES[s["shape"]](rng, m), s) for s, m in zip(solids, sizes)])
    ids = np.repeat(np.arange(count), sizes)
    return points.astype(np.float32), ids, solids, relation, caption(solids, relation)


def _centres(rng: np.random.Generator, relation: str | None) -> list[list[float]]:
    if relation is None:
        return [[0.0, 0.0, 0.0]]
    axis = 0 if relation in ("left of", "right of") else 2
    sign = -1.0 if relation in ("left of", "below") else 1.0  # where the first solid sits on the axis
    first, second = np.zeros(3), np.zeros(3)
    first[axis], second[axis] = sign * _OFFSET, -sign * _OFFSET
    jitter = rng.uniform(-0.05, 0.05, (2, 3))
    return [(first + jitter[0]).tolist(), (second + jitter[1]).tolist()]


def _place(p: np.ndarray, solid: dict) -> np.ndarray:
    """Stretch along z, turn about z, scale, move to the centre."""
    p = p * np.array([1.0, 1.0, solid["aspect"]])
    c, s = np.cos(solid["rotation"]), np.sin(solid["rotation"])
    turn = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return (p @ turn.T) * solid["scale"] + np.asarray(solid["center"])


def caption(solids: list[dict], relation: str | None) -> str:
    """ "a torus", or "a cone left of a sphere"."""
    parts = [f"a {s['shape']}" for s in solids]
    return parts[0] if relation is None else f"{parts[0]} {relation} {parts[1]}"


class PointsDataset(MemoryDataset):
    """Point clouds: 'x' (3, size) coordinates in about [-1, 1], 'label' (first solid's shape),
    'text', 'point_objects' (size,) long object id of each point, 'objects' (dicts: shape, scale,
    aspect, rotation, center) and 'relation' ("" for one solid)."""

    modality = "points"
    num_classes = len(SHAPES_3D)
    class_names = list(SHAPES_3D)

    def __init__(self, cfg, split: Split):
        super().__init__(cfg, split)

    def build(self) -> Bundle:
        cfg, parity = self.cfg, ("train", "eval").index(self.split)
        count = cfg.num if self.split == "train" else cfg.num_eval
        clouds = [
            sample_cloud(
                item_rng(cfg.seed, self.split, i, _STREAM),
                cfg.size,
                (cfg.min_objects, cfg.max_objects),
                parity,
            )
            for i in range(count)
        ]
        x = torch.from_numpy(np.stack([c[0].T for c in clouds]))  # (N, 3, size)
        labels = torch.tensor([SHAPES_3D.index(c[2][0]["shape"]) for c in clouds])
        extras = [
            {"point_objects": torch.from_numpy(ids), "objects": solids, "relation": relation or ""}
            for _, ids, solids, relation, _ in clouds
        ]
        return Bundle(x, [c[4] for c in clouds], labels, extras)
