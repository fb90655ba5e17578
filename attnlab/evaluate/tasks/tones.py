"""The tones task: per-frame note, waveform and note-name heads, decoded into notes.

The 1D network reads two log-magnitude STFTs (a long window for pitch, a short one for timing)
and predicts per 8 ms frame whether a note sounds and, if so, its waveform and note name; notes
are the runs of sounding frames with one note name, and a clip-level head counts the notes. The
pitch itself is measured by FFT in alignment (an exact oracle); the network's note head is a
second opinion, and its pooled features feed FID/KID.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnlab.data.tones import NOTES, WAVEFORMS
from attnlab.evaluate.network import EvaluatorConfig
from attnlab.evaluate.tasks.base import IGNORE, Task, runs

VOCAB = {"waveform": list(WAVEFORMS), "note": list(NOTES)}
MAX_NOTES = 2
MIN_NOTE_S = 0.01  # shorter runs of sounding frames are clicks, not notes


class TonesTask(Task):
    kind = "tones"

    def __init__(self, vocab: dict[str, list[str]] | None = None, sample_rate: int = 8000, **options):
        super().__init__(vocab or VOCAB, sample_rate=sample_rate, **options)
        self.sample_rate = sample_rate

    def network(self, dims: int = 1, in_channels: int = 1) -> EvaluatorConfig:
        v = self.vocab
        return EvaluatorConfig(
            dims=1,
            in_channels=1,
            width=64,
            mult=(1, 1, 1),
            dense_level=1,
            stft_sizes=(512, 128),  # 64 ms resolves a semitone at C4 (16 Hz); 16 ms resolves short notes
            stft_hop=32,
            global_heads={
                "count": ("class", MAX_NOTES),
                "waveforms": ("multi", len(v["waveform"])),
                "notes": ("multi", len(v["note"])),
            },
            dense_heads={
                "active": ("binary", 1),
                "waveform": ("class", len(v["waveform"])),
                "note": ("class", len(v["note"])),
            },
        )

    def targets(self, items: list[dict], grid: tuple[int, ...], stride: int = 1) -> dict[str, Tensor]:
        n, v, frames = len(items), self.vocab, grid[0]
        cell_s = stride / self.sample_rate  # cell c is centred at c * cell_s (centred STFT frames)
        active = torch.zeros(n, 1, frames)
        dense = {a: torch.full((n, frames), IGNORE, dtype=torch.long) for a in ("waveform", "note")}
        count = torch.zeros(n, dtype=torch.long)
        present = {a: torch.zeros(n, len(v[a])) for a in ("waveform", "note")}
        for i, item in enumerate(items):
            count[i] = len(item["notes"]) - 1
            for note in item["notes"]:
                a = math.ceil(note["onset"] / cell_s)
                b = math.ceil((note["onset"] + note["duration"]) / cell_s)
                active[i, 0, a:b] = 1.0
                for key in dense:
                    dense[key][i, a:b] = v[key].index(note[key])
                    present[key][i, v[key].index(note[key])] = 1.0
        return {
            "active": active,
            **dense,
            "count": count,
            "waveforms": present["waveform"],
            "notes": present["note"],
        }

    @torch.no_grad()
    def decode(self, out: dict[str, Tensor], **context) -> list[dict]:
        active = out["active"][:, 0] > 0  # (B, F)
        probs = {a: out[a].softmax(1) for a in ("waveform", "note")}  # (B, k, F)
        counts = (out["count"].argmax(1) + 1).tolist()
        per_s = context.get("frame_s", 1.0)
        return [
            {"notes": self._notes(active[b], {a: p[b] for a, p in probs.items()}, per_s), "count": counts[b]}
            for b in range(len(active))
        ]

    def _notes(self, active: Tensor, probs: dict[str, Tensor], frame_s: float) -> list[dict]:
        """Runs of sounding frames with one note name. The count comes from the image-level head
        instead: the gap between two notes of a short clip can be shorter than a frame."""
        notes = []
        note = probs["note"].argmax(0)
        for a, b in runs(active):
            cuts = [a, *(a + 1 + torch.nonzero(note[a + 1 : b] != note[a : b - 1]).flatten()).tolist(), b]
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                if (hi - lo) * frame_s < MIN_NOTE_S:
                    continue
                vote = {k: int(p[:, lo:hi].mean(1).argmax()) for k, p in probs.items()}
                notes.append(
                    {
                        "waveform": self.vocab["waveform"][vote["waveform"]],
                        "note": self.vocab["note"][vote["note"]],
                        "start": lo * frame_s,
                        "end": hi * frame_s,
                    }
                )
        return notes

    @torch.no_grad()
    def waveform_in(
        self, out: dict[str, Tensor], b: int, start_s: float, end_s: float, frame_s: float
    ) -> str:
        """The majority waveform of sample b's frames between two times (for FFT-cut notes)."""
        a = int(start_s / frame_s)
        z = max(int(end_s / frame_s), a + 1)
        return self.vocab["waveform"][int(out["waveform"][b].softmax(0)[:, a:z].mean(1).argmax())]
