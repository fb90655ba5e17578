"""`folder`: the user's own images or WAV files, listed in a metadata.jsonl or metadata.csv.

The layout follows the Hugging Face imagefolder convention: a `file_name` column (path relative
to the folder), optional `text` (caption), `label` (int, or strings mapped to ids in sorted
order) and `split` (train, or eval/test/validation). Without a `split` column a fixed share of
rows (`eval_fraction`, at least one), drawn with the config's seed, is held out for eval.
Images are centre-cropped to a square, resized to `size` and made RGB; audio is mixed to mono,
resampled to `sample_rate` and cut or zero-padded to `size` samples; point clouds (`.ply` vertices
or `.npy` (N, 3) arrays) are centred, scaled to a largest half-extent of 0.9 and `size` of their
points drawn (seeded); a cloud with fewer points or with NaN coordinates is a bad file.

A bad row or file stops with one DataError naming it; with `skip_bad` it is skipped instead, and
`dataset.skipped` counts the bad metadata rows plus the bad files of this split (`report_skipped`
reports several splits' counts in one warning).
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
import torch

from attnlab.data.base import Bundle, MemoryDataset, Split
from attnlab.data.config import AUDIO_SIZES, DataConfig
from attnlab.data.pointfiles import POINT_EXTS, fit_cloud, read_cloud
from attnlab.data.points import POINT_SIZES
from attnlab.errors import ConfigError, DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_EXTS = (".wav", ".flac", ".ogg")
SPLIT_NAMES = {
    "train": "train",
    "eval": "eval",
    "test": "eval",
    "validation": "eval",
    "valid": "eval",
    "val": "eval",
}
IMAGE_SIZES = (8, 512)


@dataclass
class Row:
    where: str  # "metadata.jsonl line 4": how messages name the row
    fields: dict


class Problems:
    """Bad rows and files: raise on the first, or (skip_bad) collect them all."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.messages: list[str] = []

    def __call__(self, message: str) -> None:
        if not self.skip:
            raise DataError(message)
        self.messages.append(message)


# Metadata


def metadata_file(root: Path) -> Path:
    if not root.is_dir():
        raise DataError(f"data.root {str(root)!r} is not a directory")
    found = [root / n for n in ("metadata.jsonl", "metadata.csv") if (root / n).is_file()]
    if len(found) != 1:
        what = (
            "both metadata.jsonl and metadata.csv (keep one)"
            if found
            else "no metadata.jsonl or metadata.csv"
        )
        raise DataError(f"{root} has {what}")
    return found[0]


def read_rows(path: Path, problems: Problems) -> list[Row]:
    """The metadata rows that have a usable file_name, in file order."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    rows = (
        jsonl_rows(str(path), text, problems) if path.suffix == ".jsonl" else _csv_rows(path, text, problems)
    )
    good = []
    for row in rows:
        name = row.fields.get("file_name")
        if not isinstance(name, str) or not name.strip():
            problems(f"{row.where}: no 'file_name' (fields: {', '.join(map(str, row.fields)) or 'none'})")
        else:
            good.append(row)
    return good


def jsonl_rows(name: str, text: str, problems: Problems) -> list[Row]:
    """The JSON-object lines of a metadata.jsonl's `text` (named `name` in messages); a blank line is
    skipped, a bad one reported to `problems`."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as e:
            problems(f"{name} line {n}: not valid JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(fields, dict):
            problems(f"{name} line {n}: expected a JSON object, got {type(fields).__name__}")
            continue
        rows.append(Row(f"{name} line {n}", fields))
    return rows


def _csv_rows(path: Path, text: str, problems: Problems) -> list[Row]:
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header or "file_name" not in header:
        raise DataError(f"{path} has no 'file_name' column (columns: {', '.join(header or []) or 'none'})")
    rows = []
    for fields in reader:
        n = reader.line_num
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            problems(
                f"{path} line {n}: expected {len(header)} fields ({', '.join(header)}), got {len(fields)}"
            )
            continue
        rows.append(Row(f"{path} line {n}", dict(zip(header, fields))))
    return rows


# Labels, splits, modality


def label_names(rows: list[Row]) -> tuple[list[str] | None, bool]:
    """Class names by id, and whether labels are ints: int labels keep their value as id (names
    "0".."max"), string labels are numbered in sorted order. (None, False) without labels."""
    values = [r.fields["label"] for r in rows if r.fields.get("label") not in (None, "")]
    if not values:
        return None, False
    if all(_as_int(v) is not None for v in values):
        return [str(i) for i in range(max(_as_int(v) for v in values) + 1)], True
    return sorted({str(v) for v in values}), False


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def row_label(row: Row, names: list[str], numeric: bool) -> int | None:
    """The row's class id, or None when its label is missing."""
    value = row.fields.get("label")
    if value in (None, ""):
        return None
    return _as_int(value) if numeric else names.index(str(value))


def assign_splits(rows: list[Row], cfg: DataConfig, problems: Problems) -> list[tuple[Row, str]]:
    """Each usable row with its split: from a `split` column, else a seeded hold-out draw."""
    if any("split" in r.fields for r in rows):
        out = []
        for r in rows:
            split = SPLIT_NAMES.get(str(r.fields.get("split", "")).strip().lower())
            if split is None:
                problems(f"{r.where}: split {r.fields.get('split')!r} is not one of {', '.join(SPLIT_NAMES)}")
            else:
                out.append((r, split))
        return out
    if len(rows) < 2:
        raise DataError(f"{cfg.root}: {len(rows)} usable row(s); need 2 or more to hold one out for eval")
    held = np.random.default_rng(cfg.seed).permutation(len(rows))[
        : max(1, round(cfg.eval_fraction * len(rows)))
    ]
    eval_rows = set(held.tolist())
    return [(r, "eval" if i in eval_rows else "train") for i, r in enumerate(rows)]


def modality_of(rows: list[Row], problems: Problems) -> tuple[str, list[Row]]:
    """'image', 'audio' or 'points' from the file extensions; a row of another kind is a bad row."""
    kinds = {ext: "image" for ext in IMAGE_EXTS} | {ext: "audio" for ext in AUDIO_EXTS}
    kinds |= {ext: "points" for ext in POINT_EXTS}
    first = next(
        (kinds[e] for r in rows if (e := Path(r.fields["file_name"]).suffix.lower()) in kinds), "image"
    )
    keep = []
    for r in rows:
        ext = Path(r.fields["file_name"]).suffix.lower()
        if kinds.get(ext) == first:
            keep.append(r)
        elif ext in kinds:
            problems(
                f"{r.where}: {r.fields['file_name']} is {kinds[ext]} but the folder's first file is {first}"
            )
        else:
            problems(
                f"{r.where}: {r.fields['file_name']} has an unsupported type {ext or '(none)'!r} "
                f"(images: {' '.join(IMAGE_EXTS)}; audio: {' '.join(AUDIO_EXTS)}; "
                f"point clouds: {' '.join(POINT_EXTS)})"
            )
    return first, keep


# Files


def load_image(path: Path, size: int) -> np.ndarray:
    """(3, size, size) uint8: centre crop, resize, RGB."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.load()  # decode now, so a truncated file fails here
        img = ImageOps.exif_transpose(img).convert("RGB")
    img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
    return np.asarray(img).transpose(2, 0, 1)  # (3, H, W)


def load_audio(path: Path, size: int, sample_rate: int) -> np.ndarray:
    """(1, size) float32: mono, resampled, cut or zero-padded at the end."""
    import soundfile as sf
    from scipy.signal import resample_poly

    wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if sr != sample_rate:
        g = gcd(sr, sample_rate)
        wave = resample_poly(wave, sample_rate // g, sr // g).astype(np.float32)
    out = np.zeros(size, np.float32)
    out[: min(size, len(wave))] = wave[:size]
    return np.clip(out, -1.0, 1.0)[None]


# Dataset


class FolderDataset(MemoryDataset):
    """The user's images, audio or point clouds: 'x' (3, size, size), (1, size) or (3, size), 'text',
    and 'label' when the metadata has labels. Text falls back to the class name, then to ""."""

    def __init__(self, cfg: DataConfig, split: Split, report: bool = True):
        super().__init__(cfg, split)
        self.root = Path(cfg.root).expanduser()
        self.problems = Problems(cfg.skip_bad)
        rows = read_rows(metadata_file(self.root), self.problems)
        self.class_names, self._numeric_labels = label_names(rows)
        self.num_classes = None if self.class_names is None else len(self.class_names)
        self.modality, rows = modality_of(rows, self.problems)
        self._check_size()
        self.sample_rate = cfg.sample_rate if self.modality == "audio" else None
        self.rows = [r for r, s in assign_splits(rows, cfg, self.problems) if s == split]
        self.metadata_skipped = len(self.problems.messages)  # the same in every split
        _ = self.bundle  # read every file now, so bad input is reported at build time
        if report:
            self._report()

    @property
    def skipped(self) -> int:
        """How many bad rows and files were skipped (0 unless skip_bad)."""
        return len(self.problems.messages)

    def _check_size(self) -> None:
        lo, hi = {"image": IMAGE_SIZES, "audio": AUDIO_SIZES, "points": POINT_SIZES}[self.modality]
        if not lo <= self.cfg.size <= hi:
            unit = {"image": "pixels", "audio": "samples", "points": "points"}[self.modality]
            raise ConfigError(
                f"data.size={self.cfg.size} is not allowed for this {self.modality} folder: expected {lo} to {hi} {unit}"
            )

    def build(self) -> Bundle:
        xs, texts, labels = [], [], []
        for row in self.rows:
            label = row_label(row, self.class_names, self._numeric_labels) if self.class_names else None
            if self.class_names and label is None:
                self.problems(f"{row.where}: no label (other rows have one)")
                continue
            loaded = self._load(row)
            if loaded is None:
                continue
            xs.append(loaded)
            labels.append(label)
            texts.append(self._text(row, label))
        if not xs:
            raise DataError(f"{self.root}: no usable rows in the {self.split} split")
        x = torch.from_numpy(np.stack(xs))
        x = x.float() / 127.5 - 1 if self.modality == "image" else x
        return Bundle(x, texts, torch.tensor(labels) if self.class_names else None)

    def _load(self, row: Row) -> np.ndarray | None:
        name = row.fields["file_name"]
        path = self.root / name
        if not path.is_file():
            self.problems(f"{row.where}: file {name} not found (looked for {path})")
            return None
        try:
            if self.modality == "image":
                return load_image(path, self.cfg.size)
            if self.modality == "points":  # (3, size): too few points or NaN coordinates are bad files
                return fit_cloud(read_cloud(path), self.cfg.size, self.cfg.seed).T.copy()
            return load_audio(path, self.cfg.size, self.cfg.sample_rate)
        except Exception as e:  # PIL and soundfile raise many types for corrupt files
            self.problems(f"{row.where}: cannot read {self.modality} {name}: {e}")
            return None

    def _text(self, row: Row, label: int | None) -> str:
        text = row.fields.get("text")
        if text not in (None, ""):
            return str(text)
        return self.class_names[label] if label is not None else ""

    def _report(self) -> None:
        if self.skipped:
            first = self.problems.messages[0]
            warnings.warn(
                f"{self.root}: skipped {self.skipped} bad row(s) or file(s); first: {first}", stacklevel=3
            )


def report_skipped(splits: dict[str, FolderDataset]) -> None:
    """One warning for the splits of one folder: the bad metadata rows, then each split's bad rows
    and files (nothing when none was skipped)."""
    first = next(iter(splits.values()))
    counts = {"metadata": first.metadata_skipped} | {
        name: ds.skipped - ds.metadata_skipped for name, ds in splits.items()
    }
    if sum(counts.values()):
        messages = [m for ds in splits.values() for m in ds.problems.messages]
        per = ", ".join(f"{k} {n}" for k, n in counts.items())
        warnings.warn(
            f"{first.root}: skipped {sum(counts.values())} bad row(s) or file(s) ({per}); first: {messages[0]}",
            stacklevel=3,
        )
