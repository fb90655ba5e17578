"""The data config: which dataset, at what size, how many items, validated once at the edge."""

from __future__ import annotations

from dataclasses import dataclass

from attnlab.errors import check

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white")
IMAGE_SIZES = {"shapes": (16, 32, 64), "digits": (16, 32)}
AUDIO_SIZES = (1024, 8000)  # inclusive range of audio lengths in samples
MAX_OBJECTS = 4  # a 2x2 layout keeps up to four objects apart at 16 px


@dataclass
class DataConfig:
    """What data to train and evaluate on.

    Attributes:
        name: a key of `attnlab.data.DATASETS` ("shapes", "digits", "tones", "points", "folder").
        size: image side in pixels (shapes: 16/32/64, digits: 16/32, folder images: 8-512) or
            audio length in samples (tones and folder audio: 1024-8000) or points per cloud
            (points and folder point clouds: 64-4096).
        num: train items of procedural data (shapes, tones); digits and folder use all they have.
        num_eval: eval items of procedural data.
        seed: seeds procedural items (item i of a split is the same for every run with this seed)
            and the folder hold-out draw.
        root: the folder dataset's directory (holding metadata.jsonl or metadata.csv).
        skip_bad: folder only: skip unreadable rows and files (counted in `dataset.skipped`)
            instead of stopping at the first.
        eval_fraction: folder only: the share of rows held out for eval when there is no `split`
            column (at least one row).
        min_objects, max_objects: shapes: objects per image (1 to 4); points: solids per cloud (1 or 2).
        positions: shapes only: captions say where each object is ("a red circle at the top
            left"); two-object captions say it anyway ("left of", "above").
        shapes, colors: shapes only: the shape and colour vocabularies (subsets of SHAPES, COLORS).
        max_notes: tones only: notes per clip (1 or 2, played one after the other).
        sample_rate: tones and folder audio: samples per second.
    """

    name: str = "shapes"
    size: int = 16
    num: int = 4096
    num_eval: int = 512
    seed: int = 0
    root: str | None = None
    skip_bad: bool = False
    eval_fraction: float = 0.1
    min_objects: int = 1
    max_objects: int = 1
    positions: bool = False
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    max_notes: int = 1
    sample_rate: int = 8000

    def __post_init__(self):
        self.shapes = tuple(self.shapes)
        self.colors = tuple(self.colors)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first key whose value is not allowed."""
        from attnlab.data.registry import DATASETS, TEXT_SETS

        text = f" ({self.name} is a text set: a text run config has modality: tokens)"
        where = text if self.name in TEXT_SETS else ""
        check(self.name in DATASETS, "data.name", self.name, f"one of {', '.join(DATASETS)}{where}")
        check(self.num >= 1, "data.num", self.num, "a positive number of items")
        check(self.num_eval >= 1, "data.num_eval", self.num_eval, "a positive number of items")
        check(0 < self.eval_fraction < 1, "data.eval_fraction", self.eval_fraction, "a fraction in (0, 1)")
        check(self.sample_rate >= 1000, "data.sample_rate", self.sample_rate, "at least 1000 Hz")
        {
            "shapes": self._validate_shapes,
            "digits": self._validate_image,
            "tones": self._validate_tones,
            "points": self._validate_points,
        }.get(self.name, self._validate_folder)()

    def _validate_image(self) -> None:
        allowed = IMAGE_SIZES[self.name]
        check(self.size in allowed, "data.size", self.size, f"one of {', '.join(map(str, allowed))} (pixels)")

    def _validate_shapes(self) -> None:
        self._validate_image()
        check(
            1 <= self.max_objects <= MAX_OBJECTS, "data.max_objects", self.max_objects, f"1 to {MAX_OBJECTS}"
        )
        check(
            1 <= self.min_objects <= self.max_objects,
            "data.min_objects",
            self.min_objects,
            f"1 to max_objects ({self.max_objects})",
        )
        _check_subset("shapes", self.shapes, SHAPES)
        _check_subset("colors", self.colors, COLORS)

    def _validate_tones(self) -> None:
        lo, hi = AUDIO_SIZES
        check(lo <= self.size <= hi, "data.size", self.size, f"an audio length of {lo} to {hi} samples")
        check(self.max_notes in (1, 2), "data.max_notes", self.max_notes, "1 or 2")

    def _validate_points(self) -> None:
        from attnlab.data.points import POINT_SIZES

        lo, hi = POINT_SIZES
        check(lo <= self.size <= hi, "data.size", self.size, f"{lo} to {hi} points per cloud")
        check(self.max_objects in (1, 2), "data.max_objects", self.max_objects, "1 or 2 solids per cloud")
        check(
            1 <= self.min_objects <= self.max_objects,
            "data.min_objects",
            self.min_objects,
            f"1 to max_objects ({self.max_objects})",
        )

    def _validate_folder(self) -> None:
        check(bool(self.root), "data.root", self.root, "the folder holding metadata.jsonl or metadata.csv")
        check(
            8 <= self.size <= AUDIO_SIZES[1],
            "data.size",
            self.size,
            "8-512 pixels, 1024-8000 samples or 64-4096 points",
        )


def _check_subset(key: str, values: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    unknown = [v for v in values if v not in allowed]
    check(
        bool(values) and not unknown,
        f"data.{key}",
        list(values),
        f"a non-empty subset of {', '.join(allowed)}",
    )
    check(len(set(values)) == len(values), f"data.{key}", list(values), "no repeated names")
