"""The progress display of a PoC: one overall bar over its stages (tqdm) and one line per finished
stage saying what it did, how long it took, or that it was already done."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tqdm.auto import tqdm


@dataclass
class StageState:
    """What a stage tells the display: whether it found its work done, and a short detail."""

    skipped: bool = False
    detail: str = ""


class Progress:
    """Args:
    total: the number of stages.
    enabled: draw the bar (lines are printed either way, unless `echo` drops them).
    echo: where stage lines go (default: above the bar).
    """

    def __init__(self, total: int, enabled: bool = True, echo: Callable[[str], None] | None = None):
        self.enabled = enabled
        self.bar = tqdm(total=total, desc="poc", unit="stage", disable=not enabled, leave=False)
        self.echo = echo or tqdm.write
        self.done = self.reused = 0

    @contextmanager
    def stage(self, who: str, what: str) -> Iterator[StageState]:
        state = StageState()
        self.bar.set_description(f"poc: {who}: {what}")
        start = time.perf_counter()
        yield state  # an exception (Ctrl-C included) propagates; finished stages are already on disk
        took = time.perf_counter() - start
        self.done += 1
        self.reused += state.skipped
        status = "done before, kept" if state.skipped else f"{_duration(took)}"
        detail = f" ({state.detail})" if state.detail else ""
        self.echo(f"[{self.done:>3}/{self.bar.total}] {who}: {what}: {status}{detail}")
        self.bar.update(1)

    def skip(self, what: str) -> None:
        self.done += 1
        self.echo(f"[{self.done:>3}/{self.bar.total}] {what}: not applicable")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
