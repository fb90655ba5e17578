"""`shapes`: procedural scenes of coloured shapes on black, captioned from their attributes.

Each image holds min_objects..max_objects objects laid out in separate cells (one object: the
whole image; two: left/right or top/bottom halves; three or four: a 2x2 grid), so objects never
overlap and a caption's spatial words are true. The first object in the caption sets the class:
label = shape index * len(colors) + colour index (indices into the config's `shapes`, `colors`).

Train and eval never share an image: the first object's radius is drawn on a 1/16-pixel lattice,
on even steps for train and odd steps for eval, and two radii that differ draw differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attnlab.data.base import Bundle, MemoryDataset, Split, item_rng, to_unit_range
from attnlab.data.config import DataConfig
from attnlab.data.draw import EXTENT, draw

PALETTE = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (0.95, 0.9, 0.15),
    "magenta": (0.9, 0.2, 0.9),
    "cyan": (0.15, 0.9, 0.9),
    "white": (0.95, 0.95, 0.95),
}
# Where a point lies in a 3x3 split of the image, and how a caption says it.
POSITIONS = (
    ("top left", "at the top left"),
    ("top", "at the top"),
    ("top right", "at the top right"),
    ("left", "on the left"),
    ("center", "in the center"),
    ("right", "on the right"),
    ("bottom left", "at the bottom left"),
    ("bottom", "at the bottom"),
    ("bottom right", "at the bottom right"),
)
_STREAM = 1  # keeps this dataset's random draws apart from other datasets'
_LATTICE = 16  # radius steps per pixel for the train/eval parity rule
_MARGIN = 0.5  # pixels kept free around each object so anti-aliased edges never touch


@dataclass
class Obj:
    shape: str
    color: str
    cx: float  # centre and nominal radius in pixels
    cy: float
    r: float

    def attributes(self, size: int) -> dict:
        """Ground truth for evaluation; x, y, size as fractions of the image side."""
        row, col = (min(int(3 * v / size), 2) for v in (self.cy, self.cx))
        return {
            "shape": self.shape,
            "color": self.color,
            "x": self.cx / size,
            "y": self.cy / size,
            "size": self.r / size,
            "position": POSITIONS[3 * row + col][0],
        }


# Scenes


def _cells(rng: np.random.Generator, n: int, size: int) -> tuple[list[tuple[float, ...]], str]:
    """Cells (x0, y0, x1, y1) for n objects in caption order, and the layout's relation word."""
    s, h = float(size), size / 2
    if n == 1:
        return [(0, 0, s, s)], ""
    if n == 2:
        if rng.integers(2):
            return [(0, 0, h, s), (h, 0, s, s)], "left of"
        return [(0, 0, s, h), (0, h, s, s)], "above"
    quad = [(0, 0, h, h), (h, 0, s, h), (0, h, h, s), (h, h, s, s)]  # reading order
    return [quad[i] for i in sorted(rng.choice(4, n, replace=False))], ""


def _radius(rng, lo: float, hi: float, parity: int | None) -> float:
    """A radius in [lo, hi]; with `parity`, on a lattice step of that parity."""
    if parity is None:
        return rng.uniform(lo, hi)
    first, last = int(np.ceil(lo * _LATTICE)), int(np.floor(hi * _LATTICE))
    q = int(rng.integers(first, last + 1))
    if q % 2 != parity:
        q = q + 1 if q < last else q - 1
    return q / _LATTICE


def _place(rng, shape: str, cell, lo: float, hi: float, parity: int | None) -> tuple[float, float, float]:
    x0, y0, x1, y1 = cell
    r = _radius(rng, lo, hi, parity)
    e = EXTENT[shape] * r + _MARGIN
    return rng.uniform(x0 + e, x1 - e), rng.uniform(y0 + e, y1 - e), r


def _place_at(rng, shape: str, size: int, parity: int) -> tuple[float, float, float, int]:
    """One small object centred in a random cell of a 3x3 split (for position captions)."""
    r = _radius(rng, 0.12 * size, 0.18 * size, parity)
    cell = int(rng.integers(9))
    e = EXTENT[shape] * r + _MARGIN
    third = size / 3
    # Jitter stays a sixth of a cell from its borders, so the position word stays true.
    centre = [(k + 0.5 + rng.uniform(-0.25, 0.25)) * third for k in (cell % 3, cell // 3)]
    cx, cy = (float(np.clip(v, e, size - e)) for v in centre)
    return cx, cy, r, cell


def sample_scene(rng: np.random.Generator, cfg: DataConfig, parity: int) -> tuple[list[Obj], str]:
    """Draw one scene's objects (in caption order) and its caption."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    colors = rng.choice(len(cfg.colors), n, replace=n > len(cfg.colors))
    shapes = rng.choice(len(cfg.shapes), n, replace=n > len(cfg.shapes))
    names = [(cfg.shapes[s], cfg.colors[c]) for s, c in zip(shapes, colors)]
    if n == 1 and cfg.positions:
        cx, cy, r, cell = _place_at(rng, names[0][0], cfg.size, parity)
        obj = Obj(*names[0], cx, cy, r)
        return [obj], f"a {obj.color} {obj.shape} {POSITIONS[cell][1]}"
    cells, relation = _cells(rng, n, cfg.size)
    lo, hi = (0.2, 0.3) if n == 1 else (0.26, 0.34)
    objs = []
    for k, ((shape, color), cell) in enumerate(zip(names, cells)):
        side = min(cell[2] - cell[0], cell[3] - cell[1])
        objs.append(
            Obj(shape, color, *_place(rng, shape, cell, lo * side, hi * side, parity if k == 0 else None))
        )
    return objs, caption(objs, relation, cfg.size, cfg.positions)


def caption(objs: list[Obj], relation: str, size: int, positions: bool) -> str:
    """The caption: "a red circle", "a red circle left of a blue square" or "a red circle, a blue
    square and a green triangle" (with `positions`, each object followed by where it is)."""
    parts = [f"a {o.color} {o.shape}" for o in objs]
    if relation:
        return f"{parts[0]} {relation} {parts[1]}"
    if positions and len(objs) > 1:
        words = dict(POSITIONS)
        parts = [f"{p} {words[o.attributes(size)['position']]}" for p, o in zip(parts, objs)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# Dataset


class ShapesDataset(MemoryDataset):
    """Coloured shapes on black with captions, per-object masks and attributes.

    Items: 'x' (3, size, size), 'label', 'text', 'masks' (n_obj, size, size) bool,
    'objects' (list of dicts: shape, color, x, y, size, position).
    """

    modality = "image"

    def __init__(self, cfg: DataConfig, split: Split):
        super().__init__(cfg, split)
        self.class_names = [f"{c} {s}" for s in cfg.shapes for c in cfg.colors]
        self.num_classes = len(self.class_names)

    def build(self) -> Bundle:
        cfg, parity = self.cfg, ("train", "eval").index(self.split)
        n = cfg.num if self.split == "train" else cfg.num_eval
        scenes = [sample_scene(item_rng(cfg.seed, self.split, i, _STREAM), cfg, parity) for i in range(n)]
        images, masks = render([objs for objs, _ in scenes], cfg.size)
        labels = [
            cfg.shapes.index(o[0].shape) * len(cfg.colors) + cfg.colors.index(o[0].color) for o, _ in scenes
        ]
        extras = [
            {"masks": torch.from_numpy(m), "objects": [o.attributes(cfg.size) for o in objs]}
            for m, (objs, _) in zip(masks, scenes)
        ]
        return Bundle(to_unit_range(images), [t for _, t in scenes], torch.tensor(labels), extras)


def render(scenes: list[list[Obj]], size: int, block: int = 512) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw scenes: (N, 3, size, size) images in [0, 1] and, per scene, (n_obj, size, size) masks."""
    images, masks = np.empty((len(scenes), 3, size, size), np.float32), []
    for start in range(0, len(scenes), block):  # blocks bound the memory at 64 px
        images[start : start + block], ms = _render_block(scenes[start : start + block], size)
        masks.extend(ms)
    return images, masks


def _render_block(scenes: list[list[Obj]], size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    flat = [o for objs in scenes for o in objs]
    coverage, mask = draw(
        [o.shape for o in flat],
        np.array([o.cx for o in flat]),
        np.array([o.cy for o in flat]),
        np.array([o.r for o in flat]),
        size,
    )
    owner = np.repeat(np.arange(len(scenes)), [len(s) for s in scenes])
    slot = np.concatenate([np.arange(len(s)) for s in scenes])
    k = int(slot.max()) + 1
    cov = np.zeros((len(scenes), k, size * size), np.float32)
    cov[owner, slot] = coverage.reshape(len(flat), -1)
    rgb = np.zeros((len(scenes), 3, k), np.float32)
    rgb[owner, :, slot] = np.array([PALETTE[o.color] for o in flat], np.float32)
    # Objects never overlap, so a pixel's colour is its coverage-weighted object colour on black.
    images = np.minimum(rgb @ cov, 1.0).reshape(len(scenes), 3, size, size)  # (B, 3, H, W)
    starts = np.concatenate([[0], np.cumsum([len(s) for s in scenes])])
    return images, [mask[a:b] for a, b in zip(starts[:-1], starts[1:])]
