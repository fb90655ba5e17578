"""The loss log: one JSON line per logging window, cut back to the last checkpoint on resume."""

from __future__ import annotations

import json
import os
from pathlib import Path


class LossLog:
    """Append-only JSONL file. Each line is written with one `write` call and flushed, and a resumed
    run first truncates the file to its size at the checkpoint, so the curve continues without the
    steps that were lost (or a half-written last line).
    """

    def __init__(self, path: str | Path, keep_bytes: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            f.truncate(min(keep_bytes, f.seek(0, os.SEEK_END)))

    def append(self, record: dict) -> None:
        with open(self.path, "ab") as f:
            f.write((json.dumps(record) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0


def read_log(path: str | Path) -> list[dict]:
    """The records of a loss log (a half-written last line, from a kill, is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
