"""`attnlab edit` and `attnlab maps` on a small text model directory."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.config import RunConfig
from attnlab.models import build_model, preset
from attnlab.samples import read_png
from attnlab.train.checkpoint import save_checkpoint


def _run_dir(tmp_path, dims=2, cond="text"):
    cfg = RunConfig()
    size, attn = (16, (8,)) if dims == 2 else (1024, (256,))  # audio: attention on 256-long maps
    cfg.model = preset(
        "unet-tiny",
        dims=dims,
        size=size,
        in_channels=3 if dims == 2 else 1,
        cond=cond,
        num_classes=3,
        channel_mult=(1, 1, 1),
        attn_resolutions=attn,
    )
    cfg.data.name, cfg.data.size = ("shapes", 16) if dims == 2 else ("tones", 1024)
    cfg.sample.steps = 3
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # untrained but not zero: attention must matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = tmp_path / f"run{dims}{cond}"
    save_checkpoint(run, 1, cfg, model, None, None, {})
    return run


@pytest.fixture(scope="module")
def run2d(tmp_path_factory):
    return _run_dir(tmp_path_factory.mktemp("runs"))


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_edit_writes_source_and_edits_side_by_side(run2d, tmp_path):
    code, out = _invoke(
        "edit",
        run2d,
        "--no-ema",
        "-p",
        "a red circle",
        "-e",
        "a red circle",
        "-e",
        "a blue circle",
        "--blend",
        "circle",
        "--out",
        tmp_path,
        "--threads",
        "1",
    )
    assert code == 0, out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "seed0-side-by-side.png" in names and "edit.json" in names
    src, same = read_png(tmp_path / "seed0-source.png"), read_png(tmp_path / "seed0-edit1-a-red-circle.png")
    assert np.array_equal(src, same)  # the edit equal to the source reproduces it
    assert (tmp_path / "seed0-edit2-a-blue-circle.png").is_file()
    assert "mode replace" in out


def test_maps_writes_one_map_per_word(run2d, tmp_path):
    code, out = _invoke("maps", run2d, "--no-ema", "-p", "a red circle", "--out", tmp_path, "--threads", "1")
    assert code == 0, out
    maps = load_file(tmp_path / "heatmaps.safetensors")
    assert set(maps) == {"a", "red", "circle"}
    for m in maps.values():
        assert m.shape == (16, 16) and m.min() == 0 and m.max() == 1
    assert {"sample.png", "maps.png", "map-red.png", "maps.json"} <= {p.name for p in tmp_path.iterdir()}


def test_maps_on_audio_writes_curves(tmp_path):
    run = _run_dir(tmp_path, dims=1)
    code, out = _invoke("maps", run, "--no-ema", "-p", "a low tone", "-w", "low", "--out", tmp_path / "o")
    assert code == 0, out
    assert load_file(tmp_path / "o" / "heatmaps.safetensors")["low"].shape == (1024,)
    assert (tmp_path / "o" / "sample.wav").is_file() and (tmp_path / "o" / "map-low.png").is_file()


def test_errors_are_one_line(run2d, tmp_path):
    code, out = _invoke(
        "edit",
        run2d,
        "--no-ema",
        "-p",
        "a red circle",
        "-e",
        "a red square",
        "--factor",
        "2",
        "--out",
        tmp_path,
    )
    assert code == 2 and out.strip() == "error: --word and --factor apply to --mode reweight only"
    code, out = _invoke("maps", run2d, "--no-ema", "-p", "a red circle", "-w", "green", "--out", tmp_path)
    assert code == 2 and "word 'green' is not in the prompt 'a red circle'" in out
    code, out = _invoke("maps", _run_dir(tmp_path, cond="class"), "--no-ema", "-p", "x", "--out", tmp_path)
    assert code == 2 and "model.cond is 'class'; editing and heat maps need a text model" in out


def test_sample_with_guidance_and_caching_records_and_regenerates(run2d, tmp_path):
    from attnlab.samples import read_provenance

    args = ["sample", run2d, "--no-ema", "-p", "a red circle", "-n", "1", "--pag", "1.5", "--sag", "0.5",
            "--tgate", "0.5", "--cache-every", "2", "--out", tmp_path / "s"]  # fmt: skip
    code, out = _invoke(*args)
    assert code == 0, out
    png = next((tmp_path / "s").glob("000-*.png"))
    spec = read_provenance(png)["techniques"]["sampling"]
    assert spec["pag"]["scale"] == 1.5 and spec["tgate"] == {"gate": 0.5, "drop_cfg": True}
    assert spec["attn_cache"] == {"every": 2} and spec["sag"]["scale"] == 0.5
    code, out = _invoke("regenerate", png, "--out", tmp_path / "r")
    assert code == 0, out
    assert np.array_equal(read_png(png), read_png(tmp_path / "r" / png.name))
    code, plain = _invoke(
        "sample", run2d, "--no-ema", "-p", "a red circle", "-n", "1", "--out", tmp_path / "p"
    )
    assert not np.array_equal(read_png(png), read_png(next((tmp_path / "p").glob("000-*.png"))))


def test_sample_option_errors(run2d, tmp_path):
    code, out = _invoke("sample", run2d, "--no-ema", "-p", "x", "--tgate-keep-cfg", "--out", tmp_path)
    assert code == 2 and "--tgate-keep-cfg needs --tgate GATE" in out
    code, out = _invoke("sample", run2d, "--no-ema", "-p", "x", "--tgate", "1.5", "--out", tmp_path)
    assert code == 2 and out.strip() == "error: tgate: gate must be a fraction of the run in [0, 1], got 1.5"
