"""tones: the pitch heard is the pitch captioned; clips are deterministic and never shared by splits."""

import numpy as np
import pytest
import torch

from attnlab.data import DataConfig, build_dataset
from attnlab.data.tones import NOTES, WAVEFORMS, pitch, synthesize


def tones(split="train", **kw):
    kw = {"size": 4096, "num": 64, "num_eval": 64, **kw}
    return build_dataset(DataConfig(name="tones", **kw), split)


def peak_hz(wave: np.ndarray, sr: int, pad: int = 1) -> tuple[float, float]:
    """Frequency of the strongest FFT bin, and the bin width."""
    n = len(wave) * pad
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave)), n))
    return float(np.argmax(spectrum[1:]) + 1) * sr / n, sr / n


def test_named_notes_are_equal_tempered():
    assert pitch("A4") == 440.0 and pitch("A5") == 880.0
    assert pitch("C4") == pytest.approx(261.626, abs=1e-3)


@pytest.mark.parametrize("waveform", WAVEFORMS)
@pytest.mark.parametrize("note", ["C4", "A4", "E5", "C6"])
def test_fft_peak_is_the_pitch(waveform, note):
    wave = synthesize(
        [{"waveform": waveform, "note": note, "onset": 0, "duration": 4096, "amplitude": 0.8}], 4096, 8000
    )
    hz, bin_hz = peak_hz(wave, 8000)
    assert abs(hz - pitch(note)) <= bin_hz


def test_dataset_clips_sound_their_caption():
    ds = tones(num=40)
    assert ds.modality == "audio" and ds.sample_rate == 8000
    for i in range(len(ds)):
        item = ds[i]
        note = item["notes"][0]
        assert item["text"] == f"a {note['waveform']} tone at {note['note']}"
        assert item["pitches"] == [pitch(note["note"])]
        assert item["label"] == WAVEFORMS.index(note["waveform"]) * len(NOTES) + NOTES.index(note["note"])
        assert ds.class_names[item["label"]] == f"{note['waveform']} {note['note']}"
        a, b = (round(v * 8000) for v in (note["onset"], note["onset"] + note["duration"]))
        wave = item["x"][0].numpy()
        assert np.abs(wave[:a]).max(initial=0) == 0 and np.abs(wave[b:]).max(initial=0) == 0
        hz, bin_hz = peak_hz(wave[a:b], 8000, pad=4)
        assert abs(hz - item["pitches"][0]) <= bin_hz


def test_two_notes_follow_each_other_each_at_its_pitch():
    ds = tones(max_notes=2, num=40)
    two = [ds[i] for i in range(len(ds)) if len(ds[i]["notes"]) == 2]
    assert len(two) > 5
    for item in two:
        first, second = item["notes"]
        assert " then " in item["text"] and item["text"].endswith(
            f"a {second['waveform']} tone at {second['note']}"
        )
        assert first["onset"] + first["duration"] < second["onset"]
        assert second["onset"] + second["duration"] <= 4096 / 8000
        for note in item["notes"]:
            a, b = (round(v * 8000) for v in (note["onset"], note["onset"] + note["duration"]))
            hz, bin_hz = peak_hz(item["x"][0, a:b].numpy(), 8000, pad=4)
            assert abs(hz - note["pitch"]) <= bin_hz


def test_values_in_range_and_deterministic():
    a, b = tones(num=30), tones(num=12)
    x = a.tensors()
    assert x.shape == (30, 1, 4096) and x.abs().max() <= 1
    assert torch.equal(x[:12], b.tensors()) and a.texts()[:12] == b.texts()
    assert not torch.equal(x[:12], tones(num=12, seed=3).tensors())


def test_train_and_eval_share_no_clip():
    train, held = (
        tones("train", num=600, num_eval=300, size=1024),
        tones("eval", num=600, num_eval=300, size=1024),
    )
    starts = {
        split: [round(ds[i]["notes"][0]["onset"] * 8000) % 2 for i in range(len(ds))]
        for split, ds in (("train", train), ("eval", held))
    }
    assert set(starts["train"]) == {0} and set(starts["eval"]) == {1}
    seen = {bytes(x.numpy()) for x in train.tensors()}
    assert not any(bytes(x.numpy()) in seen for x in held.tensors())
