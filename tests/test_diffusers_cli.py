"""`attnlab sample|maps|edit --pipeline DIR` on tiny pipeline folders written by save_pretrained:
loaded offline and from safetensors only, the pipeline's own call, provenance read back from every
PNG, word positions per family, and one clear message for each bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket

import diffusers_tiny as tiny
import huggingface_hub.constants as hub
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.errors import ConfigError
from attnlab.integrations.diffusers import load
from attnlab.integrations.diffusers.load import family, load_pipeline, weights_hashes
from attnlab.integrations.diffusers.words import word_token_indices
from attnlab.samples import read_png, read_provenance


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipes") / "sd"
    tiny.sd().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    pipe = tiny.sd3()
    pipe.vae.register_to_config(shift_factor=0.0609)  # SD3's VAE config has one; decoding reads it
    folder = tmp_path_factory.mktemp("pipes") / "sd3"
    pipe.save_pretrained(folder)
    return folder


def invoke(*args) -> tuple[int, str]:
    args = [*args, "--threads", "1"] if args[0] in ("sample", "maps") else list(args)
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy(folder, dest, drop=()):
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns(*drop) if drop else None)
    return dest


# Sampling


def test_sample_is_the_pipelines_own_call_with_provenance(sd_dir, tmp_path):
    out = tmp_path / "out"
    code, text = invoke(
        "sample", "--pipeline", sd_dir, "-p", "a red car", "-n", "2", "--steps", "2", "-g", "4",
        "--precision", "fp32", "--seed", "5", "-o", out,
    )  # fmt: skip
    assert code == 0, text
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000-a-red-car-seed5.png", "001-a-red-car-seed6.png", "grid.png", "request.json"]
    meta = read_provenance(out / "001-a-red-car-seed6.png")
    assert meta["pipeline"] == str(sd_dir.resolve()) and meta["pipeline_class"] == "StableDiffusionPipeline"
    assert meta["family"] == "sd" and meta["sampler"] == "DDIMScheduler"
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["guidance"]) == ("a red car", 6, 2, 4.0)
    assert meta["precision"] == "fp32" and meta["techniques"] == {"sampling": {}}
    files = sorted(sd_dir.rglob("*.safetensors"))
    assert meta["weights_sha256"] == {p.relative_to(sd_dir).as_posix(): sha256(p) for p in files}
    assert len(files) == 3  # text encoder, U-Net, VAE

    # the same image as diffusers' own pipeline, loaded and called by hand from seed 6
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(6)
    want = pipe("a red car", num_inference_steps=2, guidance_scale=4.0, generator=g, output_type="np").images[
        0
    ]
    got = read_png(out / "001-a-red-car-seed6.png")
    assert np.abs(got.astype(int) - (want * 255).round().astype(int)).max() <= 1


def test_sample_controls_change_the_image_and_are_recorded(sd_dir, tmp_path):
    args = ("-p", "a red car", "-n", "1", "--steps", "2", "--precision", "fp32")
    assert invoke("sample", "--pipeline", sd_dir, *args, "-o", tmp_path / "bare")[0] == 0
    code, text = invoke(
        "sample",
        "--pipeline",
        sd_dir,
        *args,
        "--pag",
        "3",
        "-t",
        "attn_cache.every=2",
        "-o",
        tmp_path / "pag",
    )
    assert code == 0, text
    bare, pag = (read_png(tmp_path / d / "000-a-red-car-seed0.png") for d in ("bare", "pag"))
    assert np.abs(bare.astype(int) - pag.astype(int)).max() > 2
    meta = read_provenance(tmp_path / "pag" / "000-a-red-car-seed0.png")
    assert meta["techniques"]["sampling"] == {"pag": {"scale": 3.0}, "attn_cache": {"every": 2}}
    request = json.loads((tmp_path / "pag" / "request.json").read_text())
    assert (
        request["files"] == ["000-a-red-car-seed0.png"]
        and request["weights_sha256"] == meta["weights_sha256"]
    )


def test_bf16_loads_the_weights_in_bf16_and_says_so(sd_dir, tmp_path):
    pipe = load_pipeline(sd_dir, "bf16", "cpu")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.attnlab_precision == "bf16"
    code, text = invoke(
        "sample",
        "--pipeline",
        sd_dir,
        "-p",
        "a cat",
        "-n",
        "1",
        "--steps",
        "2",
        "--precision",
        "bf16",
        "-o",
        tmp_path,
    )
    assert code == 0, text
    assert read_provenance(tmp_path / "000-a-cat-seed0.png")["precision"] == "bf16"


def test_loading_is_local_offline_and_safetensors_only(sd_dir, monkeypatch):
    from diffusers import DiffusionPipeline

    seen = {}
    original = DiffusionPipeline.from_pretrained.__func__

    def spy(cls, path, **kw):
        seen.update(kw, env=os.environ.get("HF_HUB_OFFLINE"), const=hub.HF_HUB_OFFLINE)
        return original(cls, path, **kw)

    def no_network(*args, **kwargs):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(spy))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    pipe = load_pipeline(sd_dir, "fp32", "cpu")
    assert family(pipe) == "sd"
    assert seen["local_files_only"] is True and seen["use_safetensors"] is True
    assert seen["env"] == "1" and seen["const"] is True
    assert "HF_HUB_OFFLINE" not in os.environ and hub.HF_HUB_OFFLINE is False  # restored after the load


# Heat maps


def test_maps_writes_a_map_per_word_with_provenance(sd_dir, tmp_path):
    code, text = invoke(
        "maps", "--pipeline", sd_dir, "-p", "a red car", "-w", "red", "-w", "car", "--steps", "2",
        "--precision", "fp32", "-o", tmp_path,
    )  # fmt: skip
    assert code == 0, text
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "sample.png",
        "map-red.png",
        "map-car.png",
        "maps.png",
        "heatmaps.safetensors",
        "maps.json",
    } <= names
    maps = load_file(tmp_path / "heatmaps.safetensors")
    image = read_png(tmp_path / "sample.png")
    assert set(maps) == {"red", "car"}
    for m in maps.values():
        assert m.shape == image.shape[:2] and m.min() >= 0 and m.max() <= 1 and m.max() > 0.5
    assert not torch.equal(maps["red"], maps["car"])
    meta = read_provenance(tmp_path / "sample.png")
    assert meta["techniques"] == {"sampling": {"heatmaps": {"layers": ["**"], "start": 0.0, "end": 1.0}}}
    assert meta["weights_sha256"] == weights_hashes(sd_dir) and meta["prompt"] == "a red car"


def test_maps_on_joint_attention_sd3(sd3_dir, tmp_path):
    code, text = invoke(
        "maps",
        "--pipeline",
        sd3_dir,
        "-p",
        "a red car",
        "--steps",
        "2",
        "--precision",
        "fp32",
        "-o",
        tmp_path,
    )
    assert code == 0, text
    maps = load_file(tmp_path / "heatmaps.safetensors")
    assert set(maps) == {"a", "red", "car"} and all(torch.isfinite(m).all() for m in maps.values())
    assert read_provenance(tmp_path / "sample.png")["family"] == "sd3"


@pytest.fixture(scope="module")
def pipes():
    return {
        "sd": tiny.sd(),
        "sdxl": tiny.sdxl(),
        "pixart": tiny.pixart(),
        "sd3": tiny.sd3(),
        "flux": tiny.flux(),
    }


@pytest.mark.parametrize(
    "fam, want",
    [
        ("sd", [2, 6]),  # CLIP: BOS first
        ("sdxl", [2, 6]),
        ("pixart", [1, 5]),  # T5: no BOS
        ("sd3", [2, 6, 78, 82]),  # CLIP's 77 positions, then T5's
        ("flux", [1, 5]),  # T5 only
    ],
)
def test_word_positions_in_each_familys_text(pipes, fam, want):
    pipe = pipes[fam]
    assert family(pipe) == fam
    assert word_token_indices(pipe, "a red car and a red ball", "red") == want


def test_word_positions_cover_every_piece_of_a_phrase(pipes):
    assert word_token_indices(pipes["sd"], "a Red car", "red car") == [2, 3]
    assert word_token_indices(pipes["flux"], "a Red car", "red car") == [1, 2]


def test_a_pipeline_without_a_tokenizer_cannot_take_heat_maps(pipes, monkeypatch):
    monkeypatch.setattr(pipes["sd"], "tokenizer", None)
    with pytest.raises(ConfigError, match="no tokenizer: heat maps need a text-conditioned pipeline"):
        word_token_indices(pipes["sd"], "a red car", "red")


# Bad input: one line, exit code 2


def error_of(*args) -> str:
    code, text = invoke(*args)
    assert code == 2, text
    lines = text.strip().splitlines()
    assert "Traceback" not in text and len(lines) == 1 and lines[0].startswith("error: "), text
    return text


def test_a_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    text = error_of("sample", "--pipeline", tmp_path, "-p", "x", "-o", tmp_path / "o")
    assert "not a diffusers pipeline folder (no model_index.json)" in text
    assert "no such folder" in error_of(
        "maps", "--pipeline", tmp_path / "nope", "-p", "x", "-o", tmp_path / "o"
    )


@pytest.mark.parametrize(
    "name, says",
    [
        ("NoSuchPipeline", "unknown pipeline class 'NoSuchPipeline'"),
        ("DiTPipeline", "'DiTPipeline' is not supported"),
    ],
)
def test_an_unknown_or_unsupported_pipeline_class(tmp_path, name, says):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": name}))
    text = error_of("sample", "--pipeline", tmp_path, "-p", "x", "-o", tmp_path / "o")
    assert says in text and "StableDiffusionPipeline" in text


def test_a_missing_component_folder(sd_dir, tmp_path):
    folder = copy(sd_dir, tmp_path / "p", drop=("unet",))
    text = error_of("sample", "--pipeline", folder, "-p", "x", "-o", tmp_path / "o")
    assert "component 'unet' (UNet2DConditionModel)" in text and "no folder" in text


def test_pickled_weights_are_refused_naming_the_file(sd_dir, tmp_path):
    folder = copy(sd_dir, tmp_path / "p")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    text = error_of("maps", "--pipeline", folder, "-p", "a red car", "-o", tmp_path / "o")
    assert "unet/diffusion_pytorch_model.bin holds pickled weights" in text and "safetensors only" in text


def test_controls_the_pipeline_cannot_take(sd_dir, tmp_path):
    out = tmp_path / "o"
    text = error_of(
        "sample", "--pipeline", sd_dir, "-p", "x", "--pag", "1", "--pag-layers", "up_blocks.9", "-o", out
    )
    assert "pag: layers=('up_blocks.9',) selects no self layer" in text and "mid_block.attentions.0" in text
    text = error_of(
        "maps", "--pipeline", sd_dir, "-p", "a red car", "--layers", "mid_block.*.attn1", "-o", out
    )
    assert "selects no cross layer" in text
    assert "use attnlab maps" in error_of(
        "sample", "--pipeline", sd_dir, "-p", "x", "-t", "heatmaps", "-o", out
    )
    assert "not in the prompt" in error_of(
        "maps", "--pipeline", sd_dir, "-p", "a red car", "-w", "zebra", "-o", out
    )


def test_a_technique_the_family_does_not_take_is_refused_before_loading(sd3_dir, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(load, "load_pipeline", no_load)
    text = error_of("sample", "--pipeline", sd3_dir, "-p", "x", "--tgate", "0.5", "-o", tmp_path)
    assert "technique 'tgate' does not run on sd3 pipelines" in text


def test_flags_that_do_not_fit_a_pipeline(sd_dir, tmp_path):
    out = tmp_path / "o"
    assert "--sampler applies to attnlab models" in error_of(
        "sample", "--pipeline", sd_dir, "-p", "x", "--sampler", "ddim", "-o", out
    )
    assert "--label applies to attnlab models" in error_of(
        "sample", "--pipeline", sd_dir, "-l", "1", "-o", out
    )
    assert "not both" in error_of("sample", sd_dir, "--pipeline", sd_dir, "-p", "x", "-o", out)
    assert "not neither" in error_of("maps", "-p", "x", "-o", out)
    assert "at least one --prompt" in error_of("sample", "--pipeline", sd_dir, "-o", out)
    assert "fp16 is not allowed on cpu" in error_of(
        "sample", "--pipeline", sd_dir, "-p", "x", "--precision", "fp16", "-o", out
    )
    assert "not a device" in error_of(
        "sample", "--pipeline", sd_dir, "-p", "x", "--device", "toaster", "-o", out
    )
    if not torch.cuda.is_available():
        assert "CUDA is not available" in error_of(
            "sample", "--pipeline", sd_dir, "-p", "x", "--device", "cuda", "-o", out
        )


def test_regenerate_points_a_pipeline_sample_at_sample_pipeline(sd_dir, tmp_path):
    assert (
        invoke("sample", "--pipeline", sd_dir, "-p", "a cat", "-n", "1", "--steps", "2", "-o", tmp_path)[0]
        == 0
    )
    text = error_of("regenerate", tmp_path / "000-a-cat-seed0.png", "-o", tmp_path / "again")
    assert f"attnlab sample --pipeline {sd_dir.resolve()}" in text and "--seed 0 --steps 2" in text


def test_edit_on_a_pipeline_keeps_the_source_and_records_provenance(sd_dir, tmp_path):
    args = ("--steps", "3", "-g", "4", "--precision", "fp32", "--seed", "2")
    code, text = invoke(
        "edit", "--pipeline", sd_dir, "-p", "a red car", "-e", "a blue car", *args, "-o", tmp_path / "e"
    )
    assert code == 0 and "mode replace" in text, text
    names = sorted(p.name for p in (tmp_path / "e").iterdir())
    assert names == ["edit.json", "seed2-edit1-a-blue-car.png", "seed2-side-by-side.png", "seed2-source.png"]
    meta = read_provenance(tmp_path / "e" / "seed2-edit1-a-blue-car.png")
    assert meta["pipeline"] == str(sd_dir.resolve()) and meta["prompt"] == "a blue car" and meta["seed"] == 2
    assert meta["p2p"]["mode"] == "replace" and meta["techniques"]["sampling"]["p2p"]["mode"] == "replace"
    for prompt, d in (("a red car", "red"), ("a blue car", "blue")):
        assert (
            invoke("sample", "--pipeline", sd_dir, "-p", prompt, "-n", "1", *args, "-o", tmp_path / d)[0] == 0
        )
    source, edited = (
        read_png(tmp_path / "e" / n).astype(int) for n in ("seed2-source.png", "seed2-edit1-a-blue-car.png")
    )
    red = read_png(tmp_path / "red" / "000-a-red-car-seed2.png").astype(int)
    blue = read_png(tmp_path / "blue" / "000-a-blue-car-seed2.png").astype(int)
    assert np.abs(source - red).max() <= 1  # the source row is drawn as it is alone
    # the edit keeps the source's maps: it is drawn closer to the source than its prompt alone is
    assert np.abs(edited - blue).max() > 0 and np.abs(edited - source).mean() < np.abs(blue - source).mean()


def test_edit_refuses_a_blend_on_flux_and_a_precision_on_a_run(sd_dir, tmp_path):
    text = error_of(
        "edit", "runs/none", "-p", "a red car", "-e", "a blue car", "--precision", "bf16", "-o", tmp_path
    )
    assert "--precision applies to --pipeline" in text or "runs/none" in text


def test_hashes_cover_the_components_model_index_names(sd_dir, tmp_path):
    folder = copy(sd_dir, tmp_path / "p")
    (folder / "stray.safetensors").write_bytes(b"not part of the pipeline")
    assert weights_hashes(folder) == weights_hashes(sd_dir)
    assert load.components(json.loads((sd_dir / "model_index.json").read_text())) == [
        "scheduler", "text_encoder", "tokenizer", "unet", "vae",
    ]  # fmt: skip
