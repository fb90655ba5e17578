"""`attnlab train` + `attnlab sample` end to end: files, grid, request.json, provenance that regenerates."""

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.generate import regenerate
from attnlab.samples import read_png, read_provenance, to_uint8
from attnlab.train import latest_checkpoint

TINY = [
    "model.width=16",
    "model.channel_mult=[1,2]",
    "model.attn_resolutions=[8]",
    "train.batch_size=8",
    "train.steps=2",
    "train.log_every=1",
    "train.ckpt_every=2",
    "train.progress=false",
    "data.num=32",
]
runner = CliRunner()


def _ok(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    cfg = root / "run.yaml"
    cfg.write_text("model:\n  cond: text\n")
    _ok(["train", cfg, *TINY, "--out", root / "run"])
    return root / "run"


def test_sample_writes_pngs_grid_and_request(text_run, tmp_path):
    out = tmp_path / "s"
    _ok(
        [
            "sample",
            text_run,
            "--prompt",
            "a red circle",
            "--prompt",
            "a blue square",
            "--num",
            "2",
            "--steps",
            "3",
            "--sampler",
            "ddim",
            "--guidance",
            "2",
            "--seed",
            "7",
            "--out",
            out,
        ]
    )
    request = json.loads((out / "request.json").read_text())
    assert request["prompts"] == ["a red circle", "a blue square"] and len(request["files"]) == 4
    metas = [read_provenance(out / f) for f in request["files"]]
    assert [(m["prompt"], m["seed"]) for m in metas] == [
        ("a red circle", 7),
        ("a red circle", 8),
        ("a blue square", 9),
        ("a blue square", 10),
    ]
    m = metas[0]
    assert (m["sampler"], m["steps"], m["guidance"], m["weights"]) == ("ddim", 3, 2.0, "ema.safetensors")
    assert len(m["weights_sha256"]) == 64 and "techniques" in m
    grid = read_png(out / "grid.png")
    assert grid.shape[0] >= 2 * 16 and read_provenance(out / "grid.png")["items"][3]["seed"] == 10


def test_regenerate_from_provenance_gives_the_same_pixels(text_run, tmp_path):
    out = tmp_path / "s"
    _ok(
        [
            "sample",
            text_run,
            "-p",
            "a green triangle",
            "-p",
            "a yellow circle",
            "-n",
            "3",
            "--steps",
            "4",
            "--sampler",
            "dpm++",
            "-g",
            "3",
            "--out",
            out,
        ]
    )
    files = json.loads((out / "request.json").read_text())["files"]
    x, meta = regenerate(out / files[4])  # drawn alone now, in a batch of 6 before
    assert meta["prompt"] == "a yellow circle"
    assert np.array_equal(to_uint8(x), read_png(out / files[4]))
    _ok(["regenerate", out / files[4], "--out", tmp_path / "again"])
    assert np.array_equal(read_png(tmp_path / "again" / files[4]), read_png(out / files[4]))


def test_regenerate_from_a_moved_model_checks_its_weights(text_run, tmp_path):
    out = tmp_path / "s"
    _ok(["sample", text_run, "-p", "a red square", "-n", "1", "--steps", "2", "--out", out])
    png = out / json.loads((out / "request.json").read_text())["files"][0]
    moved = tmp_path / "moved"
    shutil.copytree(text_run, moved)
    x, _ = regenerate(png, moved)
    assert np.array_equal(to_uint8(x), read_png(png))
    weights = latest_checkpoint(moved) / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")  # other weights, same size
    result = runner.invoke(app, ["regenerate", str(png), "--model", str(moved), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "sha256 differs" in result.output


def test_user_errors_are_one_line_with_exit_code_2(text_run, tmp_path):
    result = runner.invoke(app, ["sample", str(text_run), "--label", "3", "--out", str(tmp_path)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith("error: ") and "--prompt" in result.output
    result = runner.invoke(app, ["sample", str(tmp_path / "nope"), "-p", "x", "--out", str(tmp_path)])
    assert (
        result.exit_code == 2
        and "no such model directory" in result.output
        and "Traceback" not in result.output
    )
    result = runner.invoke(
        app, ["sample", str(text_run), "-p", "x", "--sampler", "euler", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "euler" in result.output


def test_class_model_and_label_range(tmp_path):
    cfg = tmp_path / "digits.yaml"
    cfg.write_text("data:\n  name: digits\nmodel:\n  cond: class\n")
    _ok(["train", cfg, *TINY, "--out", tmp_path / "run"])
    _ok(
        [
            "sample",
            tmp_path / "run",
            "--label",
            "3",
            "--label",
            "9",
            "-n",
            "1",
            "--steps",
            "2",
            "--out",
            tmp_path / "s",
        ]
    )
    files = json.loads((tmp_path / "s" / "request.json").read_text())["files"]
    assert [read_provenance(tmp_path / "s" / f)["label"] for f in files] == [3, 9]
    assert read_png(tmp_path / "s" / files[0]).ndim == 2  # one channel: a greyscale PNG
    result = runner.invoke(
        app, ["sample", str(tmp_path / "run"), "--label", "10", "--out", str(tmp_path / "t")]
    )
    assert result.exit_code == 2 and "--label 10 is out of range" in result.output


def test_audio_model_writes_wavs_with_provenance(tmp_path):
    cfg = tmp_path / "tones.yaml"
    cfg.write_text(
        "data:\n  name: tones\n  size: 1024\nmodel:\n  cond: class\n  attn_resolutions: []\n  mid_attention: false\n"
    )
    _ok(["train", cfg, *[o for o in TINY if "attn_resolutions" not in o], "--out", tmp_path / "run"])
    _ok(["sample", tmp_path / "run", "--label", "5", "-n", "2", "--steps", "2", "--out", tmp_path / "s"])
    files = json.loads((tmp_path / "s" / "request.json").read_text())["files"]
    assert all(f.endswith(".wav") for f in files)
    audio, rate = sf.read(tmp_path / "s" / files[1])
    assert audio.shape == (1024,) and rate == 8000
    assert read_provenance(tmp_path / "s" / files[1])["seed"] == 1


def _one_line_error(args, *expected):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    for text in expected:
        assert text in result.output, result.output


def test_regenerate_refuses_a_file_without_or_with_damaged_provenance(text_run, tmp_path):
    """Each is one line and exit code 2, never a traceback: no provenance (PNG, JPEG, WAV), provenance
    that is not JSON, lacks a field, has a field of the wrong type, or is a grid's."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    out = tmp_path / "s"
    _ok(["sample", text_run, "-p", "a red square", "-n", "1", "--steps", "2", "--out", out])
    good = read_provenance(out / json.loads((out / "request.json").read_text())["files"][0])

    def png(name, text):
        info = PngInfo()
        if text is not None:
            info.add_text("attnlab", text)
        Image.new("RGB", (16, 16)).save(tmp_path / name, pnginfo=info)
        return tmp_path / name

    Image.new("RGB", (16, 16)).save(tmp_path / "plain.jpg")
    sf.write(tmp_path / "plain.wav", np.zeros(64), 8000)
    (tmp_path / "text.png").write_text("not an image")
    cases = {
        png("none.png", None): "carries no attnlab provenance",
        tmp_path / "plain.jpg": "carries no attnlab provenance",
        tmp_path / "plain.wav": "carries no attnlab provenance",
        tmp_path / "text.png": "cannot read",
        png("notjson.png", "{oops"): "not valid JSON",
        png("list.png", "[1, 2]"): "not a JSON object",
        png("cut.png", json.dumps({k: v for k, v in good.items() if k != "seed"})): "has no seed",
        png("typed.png", json.dumps({**good, "steps": "four"})): "steps='four'",
        out / "grid.png": "a grid, not one sample",
    }
    for file, message in cases.items():
        _one_line_error(["regenerate", file, "--out", tmp_path / "r"], str(file), message)


def test_an_unwritable_out_is_one_line(text_run, tmp_path):
    out = tmp_path / "s"
    _ok(["sample", text_run, "-p", "a red square", "-n", "1", "--steps", "2", "--out", out])
    png = out / json.loads((out / "request.json").read_text())["files"][0]
    taken = tmp_path / "a-file"
    taken.write_text("")
    for bad in (taken, taken / "below"):
        _one_line_error(["sample", text_run, "-p", "x", "-n", "1", "--steps", "2", "--out", bad], "--out")
        _one_line_error(["regenerate", png, "--out", bad], "--out", "cannot write there")


def test_regenerate_a_wav_gives_the_same_audio(tmp_path):
    cfg = tmp_path / "tones.yaml"
    cfg.write_text(
        "data:\n  name: tones\n  size: 1024\nmodel:\n  cond: class\n  attn_resolutions: []\n  mid_attention: false\n"
    )
    _ok(["train", cfg, *[o for o in TINY if "attn_resolutions" not in o], "--out", tmp_path / "run"])
    _ok(["sample", tmp_path / "run", "--label", "5", "-n", "2", "--steps", "2", "--out", tmp_path / "s"])
    name = json.loads((tmp_path / "s" / "request.json").read_text())["files"][1]
    x, meta = regenerate(tmp_path / "s" / name)  # drawn alone now, in a batch of 2 before
    assert meta["seed"] == 1 and x.shape == (1, 1024)
    _ok(["regenerate", tmp_path / "s" / name, "--out", tmp_path / "again"])
    before, rate = sf.read(tmp_path / "s" / name, dtype="int16")
    after, rate_again = sf.read(tmp_path / "again" / name, dtype="int16")
    assert rate == rate_again == 8000 and np.array_equal(before, after)
    assert read_provenance(tmp_path / "again" / name) == read_provenance(tmp_path / "s" / name)
