"""What a finished PoC offers its raters: its variants, the items every variant drew (the same prompt,
sampling seed and training seed), and each sample as a PNG or WAV file.

Every variant of a PoC drew sample k of sampling seed s from the same noise and prompt, on the model
of training seed t; so (t, s, k) names one item, and any two variants' samples of it form a fair pair.
The PoC is read from its results.json (written last, when the report is written), so reading it
needs neither torch nor the models.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from threading import Lock

import numpy as np
from PIL import Image

from attnlab.errors import DataError
from attnlab.poc.stages import seed_dirs

QUESTIONS = ("quality", "alignment")
CACHED_FILES = 16  # sample files kept in memory (each holds one seed's samples of one variant)


class NotAFinishedPoc(DataError):
    """A folder that holds no finished PoC (no results.json, or samples missing)."""


@dataclass(frozen=True)
class Item:
    """Sample `index` of sampling seed `seed` on the models of training seed `train_seed`."""

    train_seed: int
    seed: int
    index: int
    prompt: str


@dataclass(frozen=True)
class Pair:
    """Two variants' samples of one item, in the order the page shows them."""

    item: Item
    left: str
    right: str

    @property
    def variants(self) -> tuple[str, str]:
        """The two variants in a fixed order, whichever side each was shown on."""
        return min(self.left, self.right), max(self.left, self.right)


class RatedPoc:
    """A finished PoC, read for rating.

    Args:
        root: the PoC directory (what `attnlab poc --out` wrote).
    Raises:
        NotAFinishedPoc: naming what is missing.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.results = _results(self.root)
        r = self.results
        self.title: str = r.get("title", self.root.name)
        self.reference: str = r["reference"]
        self.variants: list[str] = [v["name"] for v in r["variants"]]
        self.train_seeds: list[int] = [int(t) for t in r["train_seeds"]]
        self.seeds: list[int] = [int(s) for s in r["seeds"]]
        self.prompts: list[str] = list(r["prompts"])
        cfg = r.get("config", {})
        model = cfg.get("model") or {}
        self.kind = "pipeline" if "pipeline" in cfg else "native"
        self.audio = model.get("dims", 2) == 1
        self.sample_rate = int((cfg.get("data") or {}).get("sample_rate") or 8000)
        self.conditioned = model.get("cond", "text") != "none"
        self.items = [
            Item(t, s, k, self.prompts[k])
            for t in self.train_seeds
            for s in self.seeds
            for k in range(len(self.prompts))
        ]
        self._files = {
            v["name"]: _sample_files(self.root, v, self.train_seeds, self.seeds) for v in r["variants"]
        }
        self._item_set = set(self.items)
        self._cache: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._lock = Lock()
        if len(self.variants) < 2:
            raise NotAFinishedPoc(
                f"{self.root}: the PoC has one variant ({self.variants[0]}): nothing to compare"
            )

    def holds(self, pair: Pair) -> bool:
        """Whether both variants drew this item (the only pairs a vote may be about)."""
        known = pair.left in self._files and pair.right in self._files
        return known and pair.left != pair.right and pair.item in self._item_set

    def sample(self, variant: str, item: Item) -> np.ndarray:
        """The sample: (C, H, W) or, for audio, (C, L), in [-1, 1]."""
        x = self._load(self._files[variant][item.train_seed, item.seed])
        if item.index >= len(x):
            raise NotAFinishedPoc(
                f"{self._files[variant][item.train_seed, item.seed]}: holds {len(x)} samples, not {item.index + 1}"
            )
        return x[item.index]

    def media(self, variant: str, item: Item) -> tuple[bytes, str]:
        """The sample as a file for the page: (bytes, media type), PNG or WAV."""
        x = self.sample(variant, item)
        return (wav_bytes(x, self.sample_rate), "audio/wav") if self.audio else (png_bytes(x), "image/png")

    def _load(self, path: Path) -> np.ndarray:
        with self._lock:
            if path in self._cache:
                self._cache.move_to_end(path)
                return self._cache[path]
        x = read_samples(path)
        with self._lock:
            self._cache[path] = x
            while len(self._cache) > CACHED_FILES:
                self._cache.popitem(last=False)
        return x


def _results(root: Path) -> dict:
    path = root / "results.json"
    hint = f"run `attnlab poc CONFIG --out {root}` to the end first"
    if not root.is_dir():
        raise NotAFinishedPoc(f"{root}: no such folder")
    if not path.is_file():
        raise NotAFinishedPoc(f"{root} is not a finished PoC: it has no results.json ({hint})")
    try:
        r = json.loads(path.read_text())
        names = [v["name"] for v in r["variants"]]
        r["reference"], r["seeds"], r["train_seeds"], r["prompts"]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NotAFinishedPoc(f"{path}: not a PoC's results ({type(e).__name__}: {e}); {hint}") from None
    if not names:
        raise NotAFinishedPoc(f"{path}: lists no variants")
    return r


def _sample_files(
    root: Path, entry: dict, train_seeds: list[int], seeds: list[int]
) -> dict[tuple[int, int], Path]:
    """(training seed, sampling seed) -> the variant's samples file; every one must be there."""
    out = {}
    for ts, by_seed in entry.get("samples", {}).items():
        folder = seed_dirs(root, entry["name"], train_seeds, int(ts)).root
        out.update({(int(ts), int(s)): folder / rel for s, rel in by_seed.items()})
    for key in ((t, s) for t in train_seeds for s in seeds):
        if key not in out or not out[key].is_file():
            missing = f" ({out[key]} is missing)" if key in out else ""
            raise NotAFinishedPoc(
                f"{root} is not a finished PoC: variant {entry['name']!r} has no samples of training seed "
                f"{key[0]}, sampling seed {key[1]}{missing}"
            )
    return out


# Sample files as the page shows them


def read_samples(path: Path) -> np.ndarray:
    """A PoC samples file (safetensors, key "x") as float32 numpy."""
    try:
        from safetensors.numpy import load_file

        return load_file(str(path))["x"].astype(np.float32)
    except (TypeError, ValueError):  # a dtype numpy has not (bfloat16): through torch
        from safetensors.torch import load_file as load_torch

        return load_torch(str(path))["x"].float().numpy()
    except OSError as e:
        raise NotAFinishedPoc(f"{path}: unreadable samples ({e})") from None


def png_bytes(x: np.ndarray) -> bytes:
    """(C, H, W) in [-1, 1] -> PNG (grey for one channel)."""
    a = ((np.clip(x, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(x: np.ndarray, sample_rate: int) -> bytes:
    """(C, L) in [-1, 1] -> 16-bit PCM WAV (mono: the channels one after another, as the report plays them)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(x.reshape(-1), -1, 1), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()
