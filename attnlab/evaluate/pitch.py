"""Pitch by FFT peak picking: a Hann-windowed, zero-padded spectrum and a parabolic peak fit.

For the tones data (sine, square, saw, triangle) the fundamental is the strongest partial, so the
spectral peak is the pitch. The parabola through the log magnitudes of the peak bin and its
neighbours locates the peak between bins (Smith, "Spectral Audio Signal Processing", quadratic
interpolation), which keeps short notes well within a semitone.
"""

from __future__ import annotations

import math

import numpy as np

MIN_HZ = 50.0  # below the lowest built-in note by more than two octaves; rejects DC and rumble
SEMITONE_CENTS = 100.0


def fft_pitch(wave: np.ndarray, sample_rate: int, *, pad: int = 8) -> float:
    """Frequency in Hz of the strongest spectral peak of a 1D signal (nan for silence).

    Args:
        wave: (T,) samples.
        sample_rate: samples per second.
        pad: zero-padding factor of the FFT (finer bins for the parabolic fit).
    """
    wave = np.asarray(wave, dtype=np.float64) - np.mean(wave)
    if len(wave) < 8 or not np.any(np.abs(wave) > 1e-6):
        return math.nan
    n = 1 << int(math.ceil(math.log2(len(wave) * pad)))
    mag = np.abs(np.fft.rfft(wave * np.hanning(len(wave)), n))
    lo = max(1, int(MIN_HZ * n / sample_rate))
    k = lo + int(np.argmax(mag[lo:-1]))
    a, b, c = np.log(mag[k - 1 : k + 2] + 1e-12)
    shift = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) < 0 else 0.0
    return (k + shift) * sample_rate / n


def cents(found_hz: float, asked_hz: float) -> float:
    """Signed distance in cents (1/100 semitone) from the asked pitch to the found one."""
    if not (found_hz > 0 and asked_hz > 0):
        return math.nan
    return 1200.0 * math.log2(found_hz / asked_hz)


def active_span(wave: np.ndarray, sample_rate: int, frame_s: float = 0.005, floor: float = 0.1) -> slice:
    """Samples from the first to the last frame whose RMS exceeds `floor` x the loudest frame."""
    frame = max(1, int(frame_s * sample_rate))
    rms = _frame_rms(wave, frame)
    on = np.flatnonzero(rms > floor * (rms.max() + 1e-12))
    if len(on) == 0:
        return slice(0, len(wave))
    return slice(int(on[0]) * frame, int(on[-1] + 1) * frame)


def _frame_rms(wave: np.ndarray, frame: int) -> np.ndarray:
    n = len(wave) // frame
    return np.sqrt(np.mean(np.asarray(wave[: n * frame], np.float64).reshape(n, frame) ** 2, axis=1))


def split_notes(wave: np.ndarray, sample_rate: int, count: int, frame_s: float = 0.005) -> list[slice]:
    """Cut a clip into `count` consecutive notes at the quietest frames between them.

    With one note: the active span. With more: the active span is cut at the quietest frame within
    its middle part (the gap or the release/attack valley between two notes played in turn).
    """
    span = active_span(wave, sample_rate, frame_s)
    if count <= 1:
        return [span]
    frame = max(1, int(frame_s * sample_rate))
    rms = _frame_rms(wave[span], frame)
    cuts = []
    for j in range(1, count):
        lo, hi = int(len(rms) * (j - 0.6) / count), int(len(rms) * (j + 0.6) / count)
        cuts.append(span.start + (lo + int(np.argmin(rms[lo : max(hi, lo + 1)]))) * frame)
    bounds = [span.start, *cuts, span.stop]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
