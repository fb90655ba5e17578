"""`tones`: procedural audio clips of one or two notes, captioned with waveform and pitch.

Notes are the natural notes C4..C6 in equal temperament (A4 = 440 Hz); waveforms are band-limited
(harmonics below Nyquist only, so square and saw do not alias) and peak-normalised. A note has a
10 ms linear attack and a 40 ms linear release; two notes play one after the other.
label = waveform index * len(NOTES) + note index of the first note.

Train and eval never share a clip: the first note starts on an even sample in train and on an odd
sample in eval, and its first non-zero sample follows its onset.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from attnlab.data.base import Bundle, MemoryDataset, item_rng

NOTES = ("C4", "D4", "E4", "F4", "G4", "A4", "B4", "C5", "D5", "E5", "F5", "G5", "A5", "B5", "C6")
_MIDI = dict(zip(NOTES, (60, 62, 64, 65, 67, 69, 71, 72, 74, 76, 77, 79, 81, 83, 84)))
WAVEFORMS = ("sine", "square", "saw", "triangle")
_STREAM = 2
_ATTACK_S, _RELEASE_S = 0.010, 0.040


def pitch(note: str) -> float:
    """Frequency in Hz of a named note (equal temperament, A4 = 440 Hz)."""
    return 440.0 * 2.0 ** ((_MIDI[note] - 69) / 12)


def _harmonics(waveform: str, f: float, sr: int) -> list[tuple[int, float]]:
    """(harmonic number, amplitude) of the Fourier series, up to Nyquist."""
    top = int((sr / 2 - 1) // f)
    ks = range(1, top + 1)
    if waveform == "sine":
        return [(1, 1.0)]
    if waveform == "square":
        return [(k, 1.0 / k) for k in ks if k % 2]
    if waveform == "saw":
        return [(k, (-1.0) ** (k + 1) / k) for k in ks]
    return [(k, (-1.0) ** ((k - 1) // 2) / k**2) for k in ks if k % 2]  # triangle


@lru_cache(maxsize=256)
def wave_table(waveform: str, note: str, length: int, sr: int) -> np.ndarray:
    """`length` samples of a note starting at phase 0, peak 1 (float32)."""
    theta = 2 * np.pi * pitch(note) * np.arange(length) / sr
    wave = sum(a * np.sin(k * theta) for k, a in _harmonics(waveform, pitch(note), sr))
    return (wave / np.abs(wave).max()).astype(np.float32)


def envelope(n: int, sr: int) -> np.ndarray:
    """Linear attack from 0 and linear release to 0 over a note of n samples."""
    t = np.arange(n)
    attack = np.minimum(t / max(1, int(_ATTACK_S * sr)), 1.0)
    release = np.minimum((n - t) / max(1, int(_RELEASE_S * sr)), 1.0)
    return np.minimum(attack, release).astype(np.float32)


def sample_notes(rng: np.random.Generator, length: int, max_notes: int, parity: int) -> list[dict]:
    """One clip's notes: waveform, note, onset and duration in samples, amplitude."""
    count = int(rng.integers(1, max_notes + 1))
    onset_hi, span = (0.2, (0.5, 0.8)) if count == 1 else (0.1, (0.3, 0.42))  # fractions of the clip
    onset = int(rng.integers(0, int(onset_hi * length) // 2)) * 2 + parity
    notes = [_note(rng, onset, min(int(rng.uniform(*span) * length), length - onset))]
    if count == 2:  # the second note follows a short gap and runs at least 30 % of the clip
        onset = onset + notes[0]["duration"] + int(rng.uniform(0.02, 0.06) * length)
        notes.append(_note(rng, onset, int(rng.uniform(0.3, (length - onset) / length) * length)))
    return notes


def _note(rng: np.random.Generator, onset: int, duration: int) -> dict:
    return {
        "waveform": WAVEFORMS[rng.integers(len(WAVEFORMS))],
        "note": NOTES[rng.integers(len(NOTES))],
        "onset": onset,
        "duration": duration,
        "amplitude": float(rng.uniform(0.5, 0.9)),
    }


def synthesize(notes: list[dict], length: int, sr: int) -> np.ndarray:
    out = np.zeros(length, np.float32)
    for n in notes:
        span = slice(n["onset"], n["onset"] + n["duration"])
        tone = wave_table(n["waveform"], n["note"], length, sr)[: n["duration"]]
        out[span] += n["amplitude"] * envelope(n["duration"], sr) * tone
    return out


def caption(notes: list[dict]) -> str:
    """ "a sine tone at A4" or "a square tone at A4 then a sine tone at E5"."""
    return " then ".join(f"a {n['waveform']} tone at {n['note']}" for n in notes)


class TonesDataset(MemoryDataset):
    """Audio clips: 'x' (1, size) in [-1, 1], 'label', 'text', 'pitches' (Hz), 'notes' (dicts:
    waveform, note, pitch, onset and duration in seconds)."""

    modality = "audio"
    num_classes = len(WAVEFORMS) * len(NOTES)
    class_names = [f"{w} {n}" for w in WAVEFORMS for n in NOTES]

    def __init__(self, cfg, split):
        super().__init__(cfg, split)
        self.sample_rate = cfg.sample_rate

    def build(self) -> Bundle:
        cfg, sr, parity = self.cfg, self.cfg.sample_rate, ("train", "eval").index(self.split)
        count = cfg.num if self.split == "train" else cfg.num_eval
        clips = [
            sample_notes(item_rng(cfg.seed, self.split, i, _STREAM), cfg.size, cfg.max_notes, parity)
            for i in range(count)
        ]
        x = torch.from_numpy(np.stack([synthesize(c, cfg.size, sr) for c in clips]))[:, None]  # (N, 1, T)
        labels = torch.tensor(
            [WAVEFORMS.index(c[0]["waveform"]) * len(NOTES) + NOTES.index(c[0]["note"]) for c in clips]
        )
        extras = [
            {"pitches": [pitch(n["note"]) for n in c], "notes": [_public(n, sr) for n in c]} for c in clips
        ]
        return Bundle(x.clamp(-1, 1), [caption(c) for c in clips], labels, extras)


def _public(note: dict, sr: int) -> dict:
    return {
        "waveform": note["waveform"],
        "note": note["note"],
        "pitch": pitch(note["note"]),
        "onset": note["onset"] / sr,
        "duration": note["duration"] / sr,
    }
