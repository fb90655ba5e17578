"""Editing a real image: on a tiny Stable Diffusion (VAE latents, the pipeline's own call) and
through `attnlab edit --image` (files, edit.json, resizing, refused inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers_tiny as tiny
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.control import PromptToPrompt
from attnlab.control.inversion import invert
from attnlab.data import build_dataset
from attnlab.errors import ConfigError
from attnlab.integrations.diffusers import invert as sd
from attnlab.samples import read_png, save_png
from attnlab.train import load_model

MODEL = Path(__file__).parent / "data" / "shapes16-text"


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return tiny.sd()


def _image(pipe, seed=0):
    h, w = sd.image_size(pipe)
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# Stable Diffusion


def test_pipeline_ddpm_reconstruction_is_the_vae_round_trip(pipe):
    x = _image(pipe)
    r = sd.edit_image(pipe, x, "a red car", [], None, method="ddpm", steps=4, guidance=3.0)
    torch.testing.assert_close(
        r.reconstruction, sd.decode(pipe, sd.encode_image(pipe, x))[0], atol=1e-3, rtol=0
    )
    assert r.inversion.info["vae_psnr"] == pytest.approx(r.psnr, abs=0.05)


def test_pipeline_null_text_embeddings_reach_each_step(pipe):
    """The pipeline's call with the per-step embeddings equals the guided DDIM loop written here."""
    x, w = _image(pipe), 3.0
    z0 = sd.encode_image(pipe, x)
    den = sd.UNetDenoiser(pipe, "a red car")
    inv = invert(den, z0, "null-text", scheduler=pipe.scheduler, steps=3, guidance=w, inner_steps=2)
    sch = inv.scheduler()
    sch.set_timesteps(3)
    z = inv.x_T
    with torch.no_grad():
        for i, t in enumerate(sch.timesteps):
            c, u = den.cond(z, t), den.uncond(z, t, inv.nulls[i])
            z = sch.step(u + w * (c - u), t, z).prev_sample
    got = sd.replay(pipe, ["a red car"], inv)
    torch.testing.assert_close(got[0], sd.decode(pipe, z)[0], atol=1e-3, rtol=0)


def test_pipeline_pastes_the_input_back_outside_the_mask(pipe):
    x = _image(pipe)
    h, w = x.shape[1:]
    mask = torch.zeros(1, h, w)
    mask[:, :, : w // 2] = 1
    r = sd.edit_image(
        pipe,
        x,
        "a red car",
        ["a blue car"],
        PromptToPrompt(),
        method="ddpm",
        steps=4,
        guidance=3.0,
        mask=mask,
    )
    assert torch.equal(r.edits[0][:, :, w // 2 :], x[:, :, w // 2 :])  # pasted after decoding
    assert (r.edits[0][:, :, : w // 2] - r.reconstruction[:, :, : w // 2]).abs().max() > 1e-3


def test_pipeline_same_caption_edit_is_the_reconstruction(pipe):
    r = sd.edit_image(
        pipe, _image(pipe), "a red car", ["a red car"], PromptToPrompt(), method="ddpm", steps=3, guidance=3.0
    )
    torch.testing.assert_close(r.edits[0], r.reconstruction, atol=1e-3, rtol=0)


def test_pipeline_refuses_what_it_cannot_invert(pipe):
    with pytest.raises(ConfigError, match="empty"):
        sd.edit_image(pipe, _image(pipe), " ", [], None, method="ddpm", steps=2, guidance=1.0)
    with pytest.raises(ConfigError, match="keeps 77"):
        sd.edit_image(pipe, _image(pipe), "a red car " * 40, [], None, method="ddpm", steps=2, guidance=1.0)
    with pytest.raises(ConfigError, match="Stable Diffusion 1.x/2.x"):
        sd.check_pipeline(tiny.pixart())


# The command


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--threads", "1"]])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    _, cfg = load_model(MODEL)
    item = build_dataset(cfg.data, "eval")[0]  # "a yellow square above a blue triangle"
    d = tmp_path_factory.mktemp("photos")
    save_png(d / "photo.png", item["x"], {})
    Image.fromarray(item["masks"][1].numpy().astype("uint8") * 255).save(d / "mask.png")
    Image.open(d / "photo.png").resize((48, 32), Image.NEAREST).save(d / "wide.png")
    return d, item


SRC, DST = "a yellow square above a blue triangle", "a yellow square above a red triangle"


def test_edit_image_writes_reconstruction_edits_figure_and_json(photo, tmp_path):
    d, item = photo
    code, text = invoke(
        "edit", MODEL, "--image", d / "photo.png", "--prompt", SRC, "--edit", DST, "--mask", d / "mask.png",
        "--inversion", "ddpm", "--steps", "4", "--out", tmp_path,
    )  # fmt: skip
    assert code == 0, text
    meta = json.loads((tmp_path / "edit.json").read_text())
    assert meta["reconstruction_psnr"] > 40 and meta["inversion"]["method"] == "ddpm"
    assert {"inversion", "sampling", "total"} <= set(meta["seconds"])
    assert meta["weights_sha256"] and meta["image_sha256"] and meta["mask_sha256"]
    assert set(meta["files"]) == {
        "reconstruction.png",
        "edit1-a-yellow-square-above-a-red-triangle.png",
        "side-by-side.png",
    }
    edited = torch.from_numpy(read_png(tmp_path / meta["files"][1])).float()
    original = torch.from_numpy(read_png(d / "photo.png")).float()
    outside = ~item["masks"][1]
    assert (edited - original)[outside].abs().max() == 0  # 8-bit files: the pixels outside are the input's


def test_null_text_with_one_null_token_is_recorded(photo, tmp_path):
    d, _ = photo
    code, text = invoke(
        "edit", MODEL, "--image", d / "photo.png", "--prompt", SRC, "--edit", DST, "--inversion", "null-text",
        "--null-tokens", "one", "--steps", "3", "--out", tmp_path,
    )  # fmt: skip
    assert code == 0, text
    meta = json.loads((tmp_path / "edit.json").read_text())
    assert meta["inversion"]["method"] == "null-text"
    assert meta["inversion"]["null_tokens"] == "one", meta["inversion"]


def test_other_sizes_are_cropped_and_resized_with_a_note(photo, tmp_path):
    d, _ = photo
    code, text = invoke(
        "edit", MODEL, "--image", d / "wide.png", "--prompt", SRC, "--edit", DST, "--inversion", "ddim",
        "--steps", "3", "--out", tmp_path,
    )  # fmt: skip
    assert code == 0, text
    meta = json.loads((tmp_path / "edit.json").read_text())
    assert "48x32: centre-cropped to 32x32 and resized to 16x16" in meta["notes"][0]
    assert "note:" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "{d}/missing.png"], "missing.png: no such file"),
        (["--image", "{d}/bad.png"], "bad.png: not an image"),
        (["--image", "{d}/photo.png", "--inversion", "exact"], "--inversion 'exact' is not supported"),
        (["--mask", "{d}/mask.png"], "give --image"),
        (["--image", "{d}/photo.png", "--mask", "{d}/black.png"], "selects no pixel"),
        (
            ["--image", "{d}/photo.png", "--null-tokens", "one"],
            "--null-tokens applies to --inversion null-text",
        ),
        (
            ["--image", "{d}/photo.png", "--inversion", "null-text", "--null-tokens", "some"],
            "--null-tokens 'some'",
        ),
    ],
)
def test_bad_inputs_stop_with_one_message(photo, tmp_path, args, message):
    d, _ = photo
    (d / "bad.png").write_bytes(b"not a png")
    Image.new("L", (16, 16)).save(d / "black.png")
    code, text = invoke(
        "edit", MODEL, "--prompt", SRC, "--edit", DST, *[a.format(d=d) for a in args], "--out", tmp_path
    )
    assert code != 0 and message in text, text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text


def test_a_caption_the_encoder_cannot_read_is_named(photo, tmp_path):
    d, _ = photo
    code, text = invoke(
        "edit",
        MODEL,
        "--image",
        d / "photo.png",
        "--prompt",
        "a \u2603\ufe0f square",
        "--edit",
        DST,
        "--out",
        tmp_path,
    )
    assert code != 0 and "--prompt" in text and "[UNK]" in text, text


def test_a_pipeline_refuses_one_null_token(tmp_path):
    """A pipeline's null-text optimises its whole negative-prompt embedding: 'one' is refused first."""
    from attnlab.cli.real_edit import edit_real
    from attnlab.errors import ConfigError

    with pytest.raises(ConfigError, match="whole negative-prompt embedding"):
        edit_real(
            object(), SRC, [DST], None, {}, {"steps": 3, "guidance": 1.0}, image=tmp_path / "x.png",
            mask=None, inversion="null-text", seed=0, out=tmp_path, null_tokens="one",
        )  # fmt: skip
