"""The dataset registry: every built-in dataset by name, with what it yields, and the built-in text
sets a text run (`modality: tokens`, `attnlab.train.text`) reads."""

from __future__ import annotations

from attnlab.data.base import MemoryDataset, Split
from attnlab.data.config import DataConfig
from attnlab.data.digits import DigitsDataset
from attnlab.data.folder import FolderDataset, report_skipped
from attnlab.data.points import PointsDataset
from attnlab.data.scenes import TEXT_SPLITS, ScenesConfig
from attnlab.data.shapes import ShapesDataset
from attnlab.data.tones import TonesDataset

DATASETS: dict[str, tuple[type[MemoryDataset], str]] = {
    "shapes": (
        ShapesDataset,
        "RGB images (16/32/64 px) of 1-4 coloured shapes on black; caption, class of the first "
        "object, per-object masks and attributes",
    ),
    "digits": (
        DigitsDataset,
        "scikit-learn handwritten digits upsampled to 16/32 px, 1 channel; label 0-9 and caption",
    ),
    "tones": (
        TonesDataset,
        "8 kHz audio clips of 1-2 notes (C4-C6; sine, square, saw, triangle); caption, label, "
        "ground-truth pitches",
    ),
    "points": (
        PointsDataset,
        "3D point clouds (64-4096 points) of 1-2 solids (sphere, cube, torus, cone, cylinder, "
        "pyramid; size, aspect, turn; left of / right of / above / below); caption, label, "
        "per-point object ids and attributes",
    ),
    "folder": (
        FolderDataset,
        "your images, WAV files or point clouds (.ply, .npy) listed in metadata.jsonl/.csv (file_name, text, label, split); "
        "or your text alone (a text column) in a text run config (modality: tokens)",
    ),
}

# Text sets: not items of tensors but descriptions with condition tokens, for a text run config.
TEXT_SETS: dict[str, str] = {
    "scenes": 'descriptions of `shapes` scenes from a small grammar ("one large blue square above a small '
    "green triangle\"), conditioned on the scene's attributes as tokens (n, layout, place, size, color, "
    "shape), parsed back and checked exactly; word tokenizer; shipped reference LM for the generative "
    "perplexity. A text run config (modality: tokens), e.g. examples/text-mdlm.yaml",
}


def build_dataset(cfg: DataConfig, split: Split) -> MemoryDataset:
    """Build one split ("train" or "eval") of the dataset `cfg.name`.

    Args:
        cfg: the data config (validated when it was made).
        split: "train" or "eval"; the two never share an item.

    Returns:
        A torch Dataset of sample dicts, with `tensors()`, `texts()` and `labels()` for the whole
        split. Procedural data is generated on first access; folder data is read (and checked) now.
    """
    return DATASETS[cfg.name][0](cfg, split)


def build_splits(cfg: DataConfig, splits: tuple[Split, ...]) -> dict[str, MemoryDataset]:
    """Build every split a job will read, before it starts any work: a folder's files of each split
    are read and checked now, so a bad eval file stops a job before its training, and with
    `skip_bad` one warning counts what each split skipped.

    Returns:
        The datasets by split name.
    """
    if DATASETS[cfg.name][0] is not FolderDataset:
        return {s: build_dataset(cfg, s) for s in splits}
    built = {s: FolderDataset(cfg, s, report=False) for s in splits}
    report_skipped(built)
    return built


def describe_datasets() -> list[dict]:
    """One dict per dataset for `attnlab datasets`: name, modality, sizes, classes, what it yields."""
    rows = []
    for name, (cls, description) in DATASETS.items():
        rows.append(
            {
                "name": name,
                "modality": {
                    "tones": "audio",
                    "points": "points",
                    "folder": "image, audio, points or text",
                }.get(name, "image"),
                "sizes": _SIZES[name],
                "classes": _classes(cls),
                "description": description,
            }
        )
    return rows + [_text_row(name, description) for name, description in TEXT_SETS.items()]


def _text_row(name: str, description: str) -> dict:
    c = ScenesConfig()
    splits = ", ".join(f"{s} {n}" for s, n in zip(TEXT_SPLITS, (c.num, c.num_eval, c.num_ref)))
    return {
        "name": name,
        "modality": "text",
        "sizes": f"splits {splits} descriptions by default (data.num, num_eval, num_ref), "
        f"up to 10 words (14 with max_objects=3)",
        "classes": "none: condition tokens",
        "description": description,
    }


_SIZES = {
    "shapes": "16, 32, 64 px",
    "digits": "16, 32 px",
    "tones": "1024-8000 samples",
    "points": "64-4096 points",
    "folder": "8-512 px, 1024-8000 samples or 64-4096 points",
}


def _classes(cls: type[MemoryDataset]) -> str:
    if cls is ShapesDataset:
        return "colour x shape of the first object (12 by default)"
    if cls is FolderDataset:
        return "from the label column, if any"
    return str(cls.num_classes)
