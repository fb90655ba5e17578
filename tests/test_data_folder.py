"""folder: the user's images and audio from an imagefolder-style metadata file, and each bad input's message."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from attnlab.data import DataConfig, build_dataset
from attnlab.errors import ConfigError, DataError

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def write_png(path, rgb, size=(12, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def write_jsonl(root, rows):
    (root / "metadata.jsonl").write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    )


def image_folder(root, n=6, fmt="jsonl"):
    """n solid-colour PNGs labelled by colour name, captioned "a <colour> square"."""
    rows = []
    for i in range(n):
        name = list(COLOURS)[i % 3]
        write_png(root / "img" / f"{i}.png", COLOURS[name])
        rows.append({"file_name": f"img/{i}.png", "text": f"a {name} square", "label": name})
    if fmt == "jsonl":
        write_jsonl(root, rows)
    else:
        lines = ["file_name,text,label"] + [f"{r['file_name']},{r['text']},{r['label']}" for r in rows]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return rows


def folder(root, split="train", **kw):
    return build_dataset(DataConfig(name="folder", root=str(root), size=kw.pop("size", 8), **kw), split)


# Happy paths


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_images_with_text_and_string_labels(tmp_path, fmt):
    rows = image_folder(tmp_path, n=10, fmt=fmt)
    train, held = folder(tmp_path, "train"), folder(tmp_path, "eval")
    assert (len(train), len(held)) == (9, 1)  # 10 % held out, at least one
    assert (
        train.class_names == ["blue", "green", "red"] and train.num_classes == 3 and train.modality == "image"
    )
    texts = train.texts() + held.texts()
    assert sorted(texts) == sorted(r["text"] for r in rows)
    for ds in (train, held):
        for i in range(len(ds)):
            item = ds[i]
            colour = item["text"].split()[1]
            assert item["x"].shape == (3, 8, 8) and item["label"] == ["blue", "green", "red"].index(colour)
            expected = torch.tensor(COLOURS[colour], dtype=torch.float32) / 127.5 - 1
            assert torch.allclose(item["x"].mean((1, 2)), expected, atol=1e-6)


def test_hold_out_is_seeded_and_disjoint(tmp_path):
    image_folder(tmp_path, n=30)
    names = lambda split, seed=0: [r.fields["file_name"] for r in folder(tmp_path, split, seed=seed).rows]  # noqa: E731
    train, held = names("train"), names("eval")
    assert len(held) == 3 and names("eval") == held
    assert not set(train) & set(held) and len(train) + len(held) == 30
    assert names("eval", seed=5) != held


def test_split_column_int_labels_and_text_fallback(tmp_path):
    for i in range(4):
        write_png(tmp_path / f"{i}.png", (10 * i, 0, 0))
    write_jsonl(
        tmp_path,
        [
            {"file_name": "0.png", "label": 2, "split": "train"},
            {"file_name": "1.png", "label": 0, "split": "train"},
            {"file_name": "2.png", "label": 2, "split": "test"},
            {"file_name": "3.png", "label": 1, "split": "validation"},
        ],
    )
    train, held = folder(tmp_path, "train"), folder(tmp_path, "eval")
    assert train.labels().tolist() == [2, 0] and held.labels().tolist() == [2, 1]
    assert train.class_names == ["0", "1", "2"] and train.texts() == ["2", "0"]


def test_images_are_centre_cropped_and_made_rgb(tmp_path):
    img = np.zeros((10, 30), np.uint8)  # grey, wide: dark | bright | dark
    img[:, 10:20] = 200
    Image.fromarray(img, "L").save(tmp_path / "wide.png")
    write_png(tmp_path / "other.png", (0, 0, 0))
    write_jsonl(
        tmp_path, [{"file_name": "wide.png", "split": "train"}, {"file_name": "other.png", "split": "eval"}]
    )
    ds = folder(tmp_path, size=10)
    x = (ds[0]["x"] + 1) * 127.5
    assert x.shape == (3, 10, 10) and torch.allclose(x, torch.full_like(x, 200), atol=1)
    assert ds.labels() is None and "label" not in ds[0] and ds.texts() == [""]


def test_audio_is_mono_resampled_and_fitted(tmp_path):
    sr, hz = 16000, 440.0
    t = np.arange(sr) / sr  # one second, stereo
    sf.write(tmp_path / "long.wav", np.stack([np.sin(2 * np.pi * hz * t)] * 2, 1) * 0.5, sr)
    sf.write(tmp_path / "short.wav", np.full(800, 0.25), 8000)  # 0.1 s at the target rate
    write_jsonl(
        tmp_path,
        [
            {"file_name": "long.wav", "text": "A4", "split": "train"},
            {"file_name": "short.wav", "split": "train"},
            {"file_name": "short.wav", "split": "eval"},
        ],
    )
    ds = folder(tmp_path, size=4096)
    assert ds.modality == "audio" and ds.sample_rate == 8000 and ds.tensors().shape == (2, 1, 4096)
    wave = ds[0]["x"][0].numpy()
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(4096)))
    assert abs(np.argmax(spectrum) * 8000 / 4096 - hz) <= 8000 / 4096
    short = ds[1]["x"][0].numpy()
    assert np.allclose(short[:800], 0.25, atol=1e-4) and not short[800:].any()  # zero-padded at the end


def test_audio_size_is_checked_for_audio(tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros(100), 8000)
    write_jsonl(tmp_path, [{"file_name": "a.wav"}, {"file_name": "a.wav"}])
    with pytest.raises(ConfigError, match="data.size=16 .* audio folder: expected 1024 to 8000 samples"):
        folder(tmp_path, size=16)


# Bad input: one message naming the file or row; skip_bad skips and counts


def _bad_row(tmp_path, kind):
    """A folder of 4 good rows plus one bad row of `kind`; returns the words its message must hold."""
    rows = image_folder(tmp_path, n=4)
    rows = [json.dumps({**r, "split": "train"}) for r in rows]
    bad = {"file_name": "img/bad.png", "text": "x", "label": "red", "split": "train"}
    if kind == "missing file":
        words = ["metadata.jsonl line 5", "img/bad.png", "not found"]
    elif kind == "corrupt image":
        (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        words = ["metadata.jsonl line 5", "cannot read image img/bad.png"]
    elif kind == "truncated image":
        write_png(tmp_path / "img" / "bad.png", (1, 2, 3), size=(64, 64))
        data = (tmp_path / "img" / "bad.png").read_bytes()
        (tmp_path / "img" / "bad.png").write_bytes(data[: len(data) // 2])
        words = ["metadata.jsonl line 5", "cannot read image img/bad.png"]
    elif kind == "no file_name":
        bad = {"image": "img/0.png", "split": "train"}
        words = ["metadata.jsonl line 5", "no 'file_name'", "image, split"]
    elif kind == "bad json":
        bad = '{"file_name": "img/0.png", "text": "oops'
        words = ["metadata.jsonl line 5", "not valid JSON"]
    elif kind == "not an object":
        bad = '["img/0.png"]'
        words = ["metadata.jsonl line 5", "expected a JSON object"]
    elif kind == "no label":
        bad = {"file_name": "img/0.png", "split": "train"}
        words = ["metadata.jsonl line 5", "no label"]
    elif kind == "bad split":
        bad = {**bad, "file_name": "img/0.png", "split": "dev"}
        words = ["metadata.jsonl line 5", "split 'dev'"]
    elif kind == "unsupported type":
        (tmp_path / "img" / "notes.txt").write_text("hello")
        bad = {**bad, "file_name": "img/notes.txt"}
        words = ["metadata.jsonl line 5", "img/notes.txt", "unsupported type '.txt'"]
    rows.append(bad if isinstance(bad, str) else json.dumps(bad))
    rows.append(json.dumps({"file_name": "img/0.png", "label": "red", "split": "eval"}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return words


KINDS = [
    "missing file",
    "corrupt image",
    "truncated image",
    "no file_name",
    "bad json",
    "not an object",
    "no label",
    "bad split",
    "unsupported type",
]


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_row_stops_with_one_message_naming_it(tmp_path, kind):
    words = _bad_row(tmp_path, kind)
    with pytest.raises(DataError) as err:
        folder(tmp_path)
    for w in words:
        assert w in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", KINDS)
def test_skip_bad_skips_the_row_and_counts_it(tmp_path, kind):
    words = _bad_row(tmp_path, kind)
    with pytest.warns(UserWarning, match="skipped 1 bad row"):
        ds = folder(tmp_path, skip_bad=True)
    assert ds.skipped == 1 and len(ds) == 4 and words[1] in ds.problems.messages[0]


def test_csv_problems(tmp_path):
    image_folder(tmp_path, n=3, fmt="csv")
    (tmp_path / "metadata.csv").write_text("image,text\nimg/0.png,a\n")
    with pytest.raises(DataError, match=r"metadata.csv has no 'file_name' column \(columns: image, text\)"):
        folder(tmp_path)
    (tmp_path / "metadata.csv").write_text("file_name,text\nimg/0.png,a\nimg/1.png,b,extra\nimg/2.png,c\n")
    with pytest.raises(DataError, match=r"metadata.csv line 3: expected 2 fields \(file_name, text\), got 3"):
        folder(tmp_path)
    with pytest.warns(UserWarning):
        assert folder(tmp_path, skip_bad=True).skipped == 1


def test_corrupt_wav_names_the_file(tmp_path):
    for i in range(3):
        sf.write(tmp_path / f"{i}.wav", np.zeros(2000), 8000)
    (tmp_path / "1.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    write_jsonl(tmp_path, [{"file_name": f"{i}.wav", "split": "train"} for i in range(3)])
    with pytest.raises(DataError, match="metadata.jsonl line 2: cannot read audio 1.wav"):
        folder(tmp_path, size=2048)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(folder(tmp_path, size=2048, skip_bad=True)) == 2


def test_folder_level_problems(tmp_path):
    with pytest.raises(DataError, match="is not a directory"):
        folder(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no metadata.jsonl or metadata.csv"):
        folder(tmp_path)
    image_folder(tmp_path, n=3)
    (tmp_path / "metadata.csv").write_text("file_name\nimg/0.png\n")
    with pytest.raises(DataError, match="both metadata.jsonl and metadata.csv"):
        folder(tmp_path)
    (tmp_path / "metadata.csv").unlink()
    write_jsonl(tmp_path, [{"file_name": "img/0.png"}])
    with pytest.raises(DataError, match="need 2 or more"):
        folder(tmp_path)


# Every split a job reads, checked before it starts


def _split_folder(root):
    """Four train and three eval images; eval's 5.png is corrupt, train's 1.png and eval's 6.png are
    missing, and one metadata line is not JSON."""
    rows = []
    for i in range(7):
        write_png(root / f"{i}.png", COLOURS["red"])
        rows.append({"file_name": f"{i}.png", "split": "train" if i < 4 else "eval"})
    (root / "5.png").write_bytes(b"not a png")
    (root / "1.png").unlink()
    (root / "6.png").unlink()
    write_jsonl(root, [*rows, "{oops"])


def test_build_splits_checks_the_eval_split_too(tmp_path):
    from attnlab.data import build_splits

    for i in range(4):
        write_png(tmp_path / f"{i}.png", COLOURS["red"])
    (tmp_path / "3.png").write_bytes(b"not a png")
    write_jsonl(
        tmp_path, [{"file_name": f"{i}.png", "split": "train" if i < 2 else "eval"} for i in range(4)]
    )
    cfg = DataConfig(name="folder", root=str(tmp_path), size=8)
    assert len(build_dataset(cfg, "train")) == 2  # the train split alone does not read eval's files
    with pytest.raises(DataError, match="line 4: cannot read image 3.png"):
        build_splits(cfg, ("train", "eval"))


def test_skip_bad_reports_every_split_in_one_warning(tmp_path):
    import warnings

    from attnlab.data import build_splits

    _split_folder(tmp_path)
    cfg = DataConfig(name="folder", root=str(tmp_path), size=8, skip_bad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = build_splits(cfg, ("train", "eval"))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "skipped 4 bad row(s) or file(s) (metadata 1, train 1, eval 2)" in messages[0]
    assert len(built["train"]) == 3 and len(built["eval"]) == 1


def test_build_splits_of_built_in_data_is_build_dataset():
    from attnlab.data import build_splits

    cfg = DataConfig(name="shapes", size=16, num=8, num_eval=4)
    built = build_splits(cfg, ("train", "eval"))
    assert torch.equal(built["eval"].tensors(), build_dataset(cfg, "eval").tensors())
