"""The shapes task: per-pixel object, shape, colour and position heads, decoded into objects.

Every pixel says whether it belongs to an object and, if so, that object's shape, colour and
3x3 position cell (so a position is judged from the whole object, not read off a centroid).
Objects are the connected regions of object pixels of one colour (built-in scenes never give two
touching objects one colour), and each takes its pixels' majority shape and position. Image-level
heads (count, which shapes and colours are present) shape the pooled features FID/KID read.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from attnlab.data.config import COLORS, MAX_OBJECTS, SHAPES
from attnlab.data.shapes import POSITIONS
from attnlab.evaluate.network import EvaluatorConfig
from attnlab.evaluate.tasks.base import IGNORE, Task

VOCAB = {"shape": list(SHAPES), "color": list(COLORS), "position": [name for name, _ in POSITIONS]}
MIN_AREA = 8 / 1024  # smallest object kept, as a share of the image (a built-in object covers > 3 %)


def resize_masks(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """(n, H, W) bool -> (n, *grid) bool: area-averaged when shrinking, repeated when growing."""
    m = masks.float()[None]  # (1, n, H, W)
    mode = "area" if masks.shape[-1] > grid[-1] else "nearest"
    return F.interpolate(m, size=grid, mode=mode)[0] >= 0.5


class ShapesTask(Task):
    kind = "shapes"

    def __init__(self, vocab: dict[str, list[str]] | None = None, **options):
        super().__init__(vocab or VOCAB, **options)

    def network(self, dims: int = 2, in_channels: int = 3) -> EvaluatorConfig:
        v = self.vocab
        return EvaluatorConfig(
            dims=2,
            in_channels=3,
            global_heads={
                "count": ("class", MAX_OBJECTS),
                "shapes": ("multi", len(v["shape"])),
                "colors": ("multi", len(v["color"])),
            },
            dense_heads={
                "fg": ("binary", 1),
                "shape": ("class", len(v["shape"])),
                "color": ("class", len(v["color"])),
                "position": ("class", len(v["position"])),
            },
        )

    def targets(self, items: list[dict], grid: tuple[int, ...], stride: int = 1) -> dict[str, Tensor]:
        n, v = len(items), self.vocab
        fg = torch.zeros(n, 1, *grid)
        dense = {a: torch.full((n, *grid), IGNORE, dtype=torch.long) for a in ("shape", "color", "position")}
        count = torch.zeros(n, dtype=torch.long)
        present = {a: torch.zeros(n, len(v[a])) for a in ("shape", "color")}
        for i, item in enumerate(items):
            masks = resize_masks(item["masks"], grid)  # (n_obj, *grid)
            fg[i, 0] = masks.any(0).float()
            count[i] = len(item["objects"]) - 1
            for mask, obj in zip(masks, item["objects"]):
                for a in dense:
                    dense[a][i][mask] = v[a].index(obj[a])
                for a in present:
                    present[a][i, v[a].index(obj[a])] = 1.0
        return {"fg": fg, **dense, "count": count, "shapes": present["shape"], "colors": present["color"]}

    @torch.no_grad()
    def decode(self, out: dict[str, Tensor], **context) -> list[dict]:
        fg = (out["fg"][:, 0] > 0).numpy()  # (B, H, W): sigmoid > 1/2
        probs = {a: out[a].softmax(1).numpy() for a in ("shape", "color", "position")}  # (B, k, H, W)
        return [self._objects(fg[b], {a: p[b] for a, p in probs.items()}) for b in range(len(fg))]

    def _objects(self, fg: np.ndarray, probs: dict[str, np.ndarray]) -> dict:
        h, w = fg.shape
        color = probs["color"].argmax(0)
        objects = []
        for c in range(len(self.vocab["color"])):
            regions, n = ndimage.label(fg & (color == c))
            for r in range(1, n + 1):
                pix = regions == r
                if pix.sum() < MIN_AREA * h * w:
                    continue  # a speck: anti-aliased edges of another colour, or sampling noise
                objects.append(self._object(pix, c, probs))
        objects.sort(key=lambda o: (round(3 * o["y"]), o["x"]))  # reading order, as captions list them
        return {"objects": objects, "count": len(objects)}

    def _object(self, pix: np.ndarray, color: int, probs: dict[str, np.ndarray]) -> dict:
        ys, xs = np.nonzero(pix)
        h, w = pix.shape
        vote = {a: int(probs[a][:, pix].mean(1).argmax()) for a in ("shape", "position")}
        return {
            "shape": self.vocab["shape"][vote["shape"]],
            "color": self.vocab["color"][color],
            "position": self.vocab["position"][vote["position"]],
            "x": float((xs.mean() + 0.5) / w),
            "y": float((ys.mean() + 0.5) / h),
            "area": float(pix.mean()),
        }
