"""The proof of concept on a pretrained pipeline: a tiny random-weight Stable Diffusion saved with
save_pretrained (and a tiny CLIP), run end to end, rerun, resumed after a kill, and refused inputs."""

from __future__ import annotations

import json
import shutil

import diffusers_tiny as tiny
import pytest
import torch
import yaml

from attnlab.errors import AttnlabError, ConfigError
from attnlab.poc import pipeline as pp

VARIANTS = [
    {"name": "reference"},
    {"name": "pag0", "techniques": {"pag": {"scale": 0.0, "layers": "mid_block"}}},
    {"name": "pag", "techniques": {"pag": {"scale": 3.0, "layers": "mid_block"}}},
    {"name": "tgate", "techniques": {"tgate": {"gate": 0.5}}},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-poc")
    tiny.sd().save_pretrained(root / "sd")
    (root / "prompts.txt").write_text("a red car\na blue cat\n\na green ball on a tree\n")
    return root


def clip_folder(root):
    """A tiny random CLIP saved with save_pretrained (model, tokenizer and image processor)."""
    path = root / "clip"
    if path.is_dir():
        return path
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    tok = tiny.clip_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=len(tok), bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    return path


def write_config(root, name="poc.yaml", **changes):
    cfg = {
        "pipeline": "sd",
        "prompts": "prompts.txt",
        "budget": {"sample_steps": 2, "num_samples": 3, "batch_size": 2, "guidance": 5.0},
        "variants": VARIANTS,
        "metrics": ["cost"],
        "seeds": [0, 1, 2],
        **changes,
    }
    path = root / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(path, out, overrides=()):
    cfg = pp.load_pipeline_poc_config(path, list(overrides))
    return pp.run_pipeline_poc(cfg, out, progress=False, echo=lambda s: None)


def test_runs_end_to_end_and_a_rerun_does_nothing(folder, tmp_path):
    out = tmp_path / "out"
    results = run(write_config(folder), out)
    for f in ("report.md", "report.html", "results.json", "results.csv", "figures/samples_side_by_side.png"):
        assert (out / f).is_file(), f
    names = [e["name"] for e in results["variants"]]
    assert names == ["reference", "pag0", "pag", "tgate"] and results["train_seeds"] == [0]
    ref = results["variants"][0]
    assert set(ref["per_train_seed"]["0"]) == {"0", "1", "2"} and ref["trained_by"] == "pipeline"
    assert {"latency_s", "flops_per_sample", "peak_mem_bytes", "params"} <= set(ref["metrics"])
    text = (out / "report.md").read_text()
    assert "nothing trained" in text and "Sampling seeds only" in text and "heatmaps.png" in text
    # the samples of PAG at scale 0 are the reference's, bit for bit; PAG at 3 differs
    from safetensors.torch import load_file

    x = {n: load_file(str(out / "variants" / n / "samples" / "seed-1.safetensors"))["x"] for n in names}
    assert torch.equal(x["pag0"], x["reference"]) and (x["pag"] - x["reference"]).abs().max() > 1e-3
    stamps = {p: p.stat().st_mtime_ns for p in (out / "variants").rglob("*") if p.is_file()}
    again = run(write_config(folder), out)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["variants"] == results["variants"]


def test_a_killed_run_resumes_and_only_a_changed_variant_is_redone(folder, tmp_path, monkeypatch):
    out, path = tmp_path / "out", write_config(folder)
    draw, calls = pp._draw, []

    def dying(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return draw(*args, **kw)

    monkeypatch.setattr(pp, "_draw", dying)
    with pytest.raises(KeyboardInterrupt):
        run(path, out)
    monkeypatch.setattr(pp, "_draw", draw)
    kept = {p: p.stat().st_mtime_ns for p in (out / "variants").rglob("seed-*.safetensors")}
    assert kept and not (out / "report.md").exists()
    run(path, out)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert (out / "report.md").is_file()
    before = {p: p.stat().st_mtime_ns for p in (out / "variants").rglob("seed-*.safetensors")}
    changed = [dict(v) for v in VARIANTS]
    changed[3] = {"name": "tgate", "techniques": {"tgate": {"gate": 0.25}}}
    run(write_config(folder, variants=changed), out)
    redone = {p.parent.parent.name for p, t in before.items() if p.stat().st_mtime_ns != t}
    assert redone == {"tgate"}


def test_clip_score_pag_at_zero_scores_exactly_as_the_reference(folder, tmp_path):
    pytest.importorskip("attnlab.evaluate.clip_score")
    clip = clip_folder(folder)
    results = run(write_config(folder, clip=str(clip), metrics=["clip_score", "cost"]), tmp_path / "out")
    by = {e["name"]: e for e in results["variants"]}
    ref, zero, pag = (by[n]["per_train_seed"]["0"] for n in ("reference", "pag0", "pag"))
    assert all(ref[s]["clip_score"] == zero[s]["clip_score"] for s in ref)
    assert any(ref[s]["clip_score"] != pag[s]["clip_score"] for s in ref)
    assert "CLIP score" in (tmp_path / "out" / "report.md").read_text()
    assert results["summary"]["sentences"]


# Refused inputs: one message naming the file or key


def test_a_pipeline_folder_with_pickled_weights_only(folder, tmp_path):
    bad = tmp_path / "sd"
    shutil.copytree(folder / "sd", bad)
    for f in (bad / "unet").glob("*.safetensors"):
        f.rename(f.with_name("diffusion_pytorch_model.bin"))
    shutil.copy(folder / "prompts.txt", tmp_path / "prompts.txt")
    with pytest.raises(AttnlabError, match=r"diffusion_pytorch_model\.bin holds pickled weights"):
        run(write_config(tmp_path), tmp_path / "out")


def test_a_missing_prompt_file(folder, tmp_path):
    path = write_config(folder, name="missing.yaml", prompts=str(tmp_path / "nope.txt"))
    with pytest.raises(ConfigError, match=r"prompts: .*nope\.txt"):
        run(path, tmp_path / "out")


def test_a_clip_folder_that_is_not_clip(folder, tmp_path):
    pytest.importorskip("attnlab.evaluate.clip_score")
    not_clip = tmp_path / "not-clip"
    not_clip.mkdir()
    (not_clip / "config.json").write_text(json.dumps({"model_type": "t5"}))
    path = write_config(folder, name="notclip.yaml", clip=str(not_clip), metrics=["clip_score"])
    with pytest.raises(ConfigError, match="not-clip"):
        run(path, tmp_path / "out")


def test_config_refusals_name_the_key(folder):
    with pytest.raises(ConfigError, match="clip"):
        pp.load_pipeline_poc_config(write_config(folder, name="c1.yaml", metrics=["clip_score"]))
    with pytest.raises(ConfigError, match="inception"):
        pp.load_pipeline_poc_config(
            write_config(folder, name="c2.yaml", metrics=["fid"], reference_images="x")
        )
    arch = [{"name": "rope", "techniques": {"rope": {}}}]
    with pytest.raises(ConfigError, match=r"variants\[0\]\.techniques\.rope.*training-free"):
        pp.load_pipeline_poc_config(write_config(folder, name="c3.yaml", variants=arch))
    with pytest.raises(ConfigError, match="seeds"):
        pp.load_pipeline_poc_config(write_config(folder, name="c4.yaml", seeds=[0, 1]))


def test_a_technique_the_family_does_not_take(tmp_path):
    tiny.sd3().save_pretrained(tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("a red car\n")
    path = write_config(
        tmp_path, variants=[{"name": "reference"}, {"name": "tg", "techniques": {"tgate": {}}}]
    )
    with pytest.raises(ConfigError, match=r"variants\[1\]\.techniques\.tgate.*one softmax"):
        run(path, tmp_path / "out")


def test_the_example_config_loads_and_dry_runs(folder, tmp_path):
    from pathlib import Path

    from typer.testing import CliRunner

    from attnlab.cli.main import app

    example = Path(__file__).resolve().parents[1] / "examples" / "poc-pipeline.yaml"
    args = [
        "poc",
        str(example),
        f"pipeline={folder / 'sd'}",
        "metrics=[cost]",
        "--dry-run",
        "-o",
        str(tmp_path),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "pag: samples the pipeline with {'pag': {'scale': 3.0}}" in result.output
    cfg = pp.load_pipeline_poc_config(example, [f"pipeline={folder / 'sd'}"])
    assert len(pp.read_prompts(cfg)) == 8


def test_fid_and_kid_against_reference_images(folder, tmp_path):
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from attnlab.evaluate.inception import FIDInception

    torch.manual_seed(0)
    inception = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in FIDInception().state_dict().items()}, str(inception))
    images = tmp_path / "ours"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
    path = write_config(
        folder, name="fid.yaml", variants=VARIANTS[:2], metrics=["fid", "kid"], heatmaps=False,
        reference_images=str(images), inception=str(inception),
        budget={"sample_steps": 2, "num_samples": 2, "batch_size": 2, "guidance": 5.0},
    )  # fmt: skip
    results = run(path, tmp_path / "out")
    ref, zero = (e["per_train_seed"]["0"] for e in results["variants"])
    assert all(np.isfinite(ref[s]["fid"]) and "kid_mean" in ref[s] for s in ref)
    assert all(ref[s]["fid"] == zero[s]["fid"] for s in ref)  # PAG at 0: the reference's samples
    (images / "bad.png").write_text("not an image")
    with pytest.raises(ConfigError, match=r"bad\.png is not a readable image"):
        run(path, tmp_path / "out2")


def _masked_folder(root):
    """Three 32 px images of a coloured square on grey, captioned, each with the square's mask."""
    import numpy as np
    from PIL import Image

    folder = root / "masked"
    (folder / "masks").mkdir(parents=True)
    rows = []
    for i, (word, colour) in enumerate(
        (("car", (200, 30, 30)), ("cat", (30, 30, 200)), ("ball", (30, 200, 30)))
    ):
        img = np.full((32, 32, 3), 128, dtype=np.uint8)
        mask = np.zeros((32, 32), dtype=np.uint8)
        y, x = 4 + 6 * i, 20 - 6 * i
        img[y : y + 10, x : x + 10], mask[y : y + 10, x : x + 10] = colour, 255
        Image.fromarray(img).save(folder / f"{i}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a red {word}", "masks": {word: f"masks/{i}.png"}})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def test_heat_map_localisation_on_masked_reference_images(folder, tmp_path):
    masked = _masked_folder(tmp_path)
    path = write_config(
        folder, name="loc.yaml", variants=VARIANTS[:3], metrics=["localisation"], heatmaps=False,
        reference_images=str(masked),
    )  # fmt: skip
    results = run(path, tmp_path / "out")
    by = {e["name"]: e["per_train_seed"]["0"] for e in results["variants"]}
    for s in ("0", "1", "2"):
        score = by["reference"][s]
        assert 0 <= score["mask_iou"] <= 1 and 0 < score["mask_area_iou"] < 1
        assert by["pag0"][s]["mask_iou"] == score["mask_iou"]  # PAG at 0 changes no map
    assert "heat-map IoU (masked words)" in (tmp_path / "out" / "report.md").read_text()
    rows = (masked / "metadata.jsonl").read_text().replace('"car": "masks/0.png"', '"truck": "masks/0.png"')
    (masked / "metadata.jsonl").write_text(rows)
    with pytest.raises(ConfigError, match=r"mask's word 'truck' is not in 'a red car'"):
        run(path, tmp_path / "out2")


def test_localisation_denoises_the_real_image_noised_to_each_timestep(folder, tmp_path):
    """The denoiser sees, at step i, the VAE latent of the real image noised to timestep t_i:
    sqrt(abar) z0 + sqrt(1 - abar) eps (DDIM's schedule), written here from the definition."""
    from attnlab.integrations.diffusers.load import load_pipeline

    masked = _masked_folder(tmp_path)
    cfg = pp.load_pipeline_poc_config(
        write_config(folder, name="l2.yaml", metrics=["localisation"], reference_images=str(masked))
    )
    pipe = load_pipeline(cfg.pipeline, "fp32", "cpu")
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(
            (kw.get("sample", a[0] if a else None), a[1] if len(a) > 1 else kw["timestep"])
        ),
        with_kwargs=True,
    )
    try:
        pp.localisation_scores(cfg, pipe, {}, pp.masked_images(masked)[:1], seed=4)
    finally:
        hook.remove()
    x = pp._read_rgb(masked / "0.png", (32, 32))[None]
    with torch.no_grad():
        z0 = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(4))
    ab = pipe.scheduler.alphas_cumprod
    assert len(seen) == cfg.budget.sample_steps
    for sample, t in seen:
        a = ab[int(t)]
        want = a.sqrt() * z0 + (1 - a).sqrt() * eps
        assert (sample - want).abs().max() <= 1e-5 * want.abs().max()
