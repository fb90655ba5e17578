"""diffusers denoisers as attnlab backbones: trained by attnlab's trainer, resumed bit-identically,
saved as safetensors (and as a diffusers model folder), sampled with PAG and heat maps, refused
configs named."""

from __future__ import annotations

import pytest
import torch
from models_util import TINY_RUN
from safetensors.torch import load_file

from attnlab.attention import control
from attnlab.config import load_config
from attnlab.control import PAG, HeatMaps
from attnlab.diffusion import make_scheduler, sample
from attnlab.errors import ConfigError
from attnlab.models import ModelConfig, build_model
from attnlab.train import latest_checkpoint, load_model, train

UNET = [
    "model.backbone=diffusers",
    "model.diffusers_class=UNet2DConditionModel",
    "model.diffusers_config={block_out_channels: [16, 32], layers_per_block: 1, attention_head_dim: 4,"
    " norm_num_groups: 8, down_block_types: [CrossAttnDownBlock2D, DownBlock2D],"
    " up_block_types: [UpBlock2D, CrossAttnUpBlock2D]}",
]
PIXART = [
    "model.backbone=diffusers",
    "model.diffusers_class=PixArtTransformer2DModel",
    "model.diffusers_config={num_layers: 2, attention_head_dim: 8, num_attention_heads: 2, patch_size: 2,"
    " cross_attention_dim: 16, norm_type: ada_norm_single, num_embeds_ada_norm: 1000}",
]
STEPS = ["train.steps=4", "train.warmup=1", "train.log_every=1", "train.ckpt_every=2"]


def run_cfg(backbone, cond):
    return [*TINY_RUN, f"model.cond={cond}", *backbone, *STEPS]


@pytest.mark.parametrize("backbone, cond", [(UNET, "text"), (PIXART, "text"), (UNET, "class")])
def test_trains_resumes_bit_identically_and_samples_with_pag_and_maps(backbone, cond, tmp_path, monkeypatch):
    overrides = run_cfg(backbone, cond)
    full = tmp_path / "full"
    train(load_config(None, overrides), full)
    ckpt = latest_checkpoint(full)
    assert ckpt.name == "step-0000004" and (ckpt / "diffusers" / "config.json").is_file()
    # the exported folder is a diffusers model: its weights are the checkpoint's EMA weights
    import diffusers

    cls = getattr(diffusers, load_config(None, overrides).model.diffusers_class)
    net = cls.from_pretrained(ckpt / "diffusers", use_safetensors=True)
    ema = load_file(ckpt / "ema.safetensors")
    assert all(torch.equal(v, ema["net." + k]) for k, v in net.state_dict().items())

    # a run stopped after checkpoint 2 and rerun ends where the uninterrupted run ends
    import attnlab.train.checkpoint as ck

    real = ck.save_file

    def stop_at_4(tensors, path, *a, **k):
        if "tmp-step-0000004" in str(path):
            raise KeyboardInterrupt
        return real(tensors, path, *a, **k)

    part = tmp_path / "part"
    monkeypatch.setattr(ck, "save_file", stop_at_4)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, overrides), part)
    monkeypatch.setattr(ck, "save_file", real)
    assert latest_checkpoint(part).name == "step-0000002"
    train(load_config(None, overrides), part)
    a, b = load_file(ckpt / "model.safetensors"), load_file(latest_checkpoint(part) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    model, cfg = load_model(full)
    if cond == "text":
        from attnlab.conditioning import get_text_encoder

        enc = get_text_encoder()
        tokens, mask = enc.encode(["a red circle", "a blue square"])
        from attnlab.conditioning import Condition

        c = Condition(tokens=tokens.float(), mask=mask.bool())
    else:
        from attnlab.conditioning import Condition

        c = Condition(labels=torch.tensor([0, 1]))
    layer = "mid_block" if "UNet" in cfg.model.diffusers_class else "transformer_blocks.1"

    def draw(guidances=(), ctrls=()):
        with control(model, list(ctrls)):
            return sample(model, (2, *cfg.model.sample_shape()), c, scheduler=make_scheduler("ddim"), steps=3,
                          guidance=2.0, seeds=[0, 1], guidances=list(guidances))  # fmt: skip

    plain = draw()
    assert torch.equal(draw([PAG(scale=0.0, layers=layer)]), plain)
    assert (draw([PAG(scale=2.0, layers=layer)]) - plain).abs().max() > 1e-4
    if cond == "text":
        maps = HeatMaps()
        again = draw(ctrls=[maps])
        assert (again - plain).abs().max() <= 1e-3  # the explicit softmax: float error, grown over 3 steps
        m = maps.maps(tuple(cfg.model.sample_shape()[1:]))
        assert m.shape[0] == 2 and torch.isfinite(m).all() and maps.count > 0


def _cfg(**kw):
    base = dict(backbone="diffusers", cond="text", size=16, in_channels=3, context_dim=24)
    return ModelConfig(**{**base, **kw})


def test_refused_configs_name_the_key():
    with pytest.raises(ConfigError, match="'UNetNope' is not a diffusers class"):
        _cfg(diffusers_class="UNetNope")
    with pytest.raises(ConfigError, match="AutoencoderKL is not a denoiser"):
        _cfg(diffusers_class="AutoencoderKL")
    with pytest.raises(
        ConfigError, match=r"model\.diffusers_config\.wings: UNet2DConditionModel has no such argument"
    ):
        _cfg(diffusers_class="UNet2DConditionModel", diffusers_config={"wings": 2})
    with pytest.raises(ConfigError, match=r"model\.diffusers_config\.sample_size: set by the data"):
        _cfg(diffusers_class="UNet2DConditionModel", diffusers_config={"sample_size": 8})
    with pytest.raises(ConfigError, match=r"model\.techniques\.rope: attnlab's architectural techniques"):
        _cfg(diffusers_class="UNet2DConditionModel", techniques={"rope": {}})
    with pytest.raises(ConfigError, match="DiTTransformer2DModel takes class"):
        _cfg(diffusers_class="DiTTransformer2DModel")


def test_dit_takes_class_labels_with_the_null_label():
    cfg = ModelConfig(backbone="diffusers", cond="class", num_classes=4, size=16, in_channels=3,
                      diffusers_class="DiTTransformer2DModel",
                      diffusers_config={"num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2})  # fmt: skip
    from attnlab.conditioning import Condition

    model = build_model(cfg).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        null = model(x, t, Condition(labels=torch.tensor([-1, -1])))
        cls = model(x, t, Condition(labels=torch.tensor([2, 2])))
        again = model(x, t, Condition(labels=torch.tensor([-1, -1])))
    assert null.shape == x.shape and torch.equal(null, again) and (null - cls).abs().max() > 1e-6


def test_backbones_example_pairs_are_within_ten_percent():
    """examples/poc-backbones.yaml: attnlab's U-Net and DiT against diffusers' UNet2DConditionModel
    and PixArtTransformer2DModel with parameters and FLOPs per call within 10%, as it says."""
    from pathlib import Path

    from attnlab.conditioning import Condition
    from attnlab.evaluate.cost import count_parameters, denoiser_flops
    from attnlab.poc import load_poc_config
    from attnlab.poc.variants import variant_model

    cfg = load_poc_config(Path(__file__).resolve().parents[1] / "examples" / "poc-backbones.yaml")
    c = Condition(tokens=torch.randn(1, 8, cfg.model.context_dim), mask=torch.ones(1, 8, dtype=torch.bool))
    size = {}
    for v in cfg.variants:
        mc = variant_model(cfg, v)
        model = build_model(mc).eval()
        size[v.name] = (count_parameters(model), denoiser_flops(model, mc.sample_shape(), c))
    for a, b in (("reference", "diffusers-unet"), ("attnlab-dit", "diffusers-pixart")):
        for i in (0, 1):
            assert abs(size[b][i] / size[a][i] - 1) < 0.10, (a, b, size[a], size[b])


def test_poc_variants_sample_a_diffusers_backbone_with_training_free_techniques(tmp_path):
    """A PoC variant whose base is a diffusers backbone takes training-free techniques (through
    the diffusers host); an architectural one on it is refused with the reason."""
    import yaml

    from attnlab.poc import load_poc_config

    unet = {
        "backbone": "diffusers",
        "diffusers_class": "UNet2DConditionModel",
        "diffusers_config": {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
                             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
    }  # fmt: skip
    cfg = {
        "data": {"name": "shapes", "size": 16, "num": 64, "num_eval": 16},
        "model": {"cond": "text", "width": 16, "channel_mult": [1, 2], "attn_resolutions": [8]},
        "budget": {"train_steps": 2, "sample_steps": 2, "num_samples": 4, "batch_size": 4},
        "variants": [
            {"name": "reference"},
            {"name": "d-unet", "model": unet, "level": 2},
            {
                "name": "d-unet-pag",
                "base": "d-unet",
                "techniques": {"pag": {"scale": 2.0, "layers": "mid_block"}},
            },
        ],
        "metrics": ["cost"],
    }
    path = tmp_path / "poc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert [v.name for v in load_poc_config(path).variants] == ["reference", "d-unet", "d-unet-pag"]
    cfg["variants"].append({"name": "d-unet-rope", "model": unet, "techniques": {"rope": {}}})
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(
        ConfigError, match=r"variants\[3\]\.techniques\.rope.*a technique of the diffusers backbone"
    ):
        load_poc_config(path)


@pytest.mark.parametrize("cls, cond", [("UNet2DConditionModel", "text"), ("PixArtTransformer2DModel", "text"),
                                       ("UNet2DConditionModel", "class")])  # fmt: skip
def test_a_missing_condition_is_the_null_condition(cls, cond):
    """model(x, t, None) is the unconditional pass, as on attnlab's own backbones: one all-zero text
    token (Condition.null_like) or the null label; the grid probe of token merging makes that call."""
    from attnlab.conditioning import Condition

    configs = {
        "UNet2DConditionModel": {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_head_dim": 4,
                                 "norm_num_groups": 8, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
        "PixArtTransformer2DModel": {"num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
                                     "patch_size": 2, "cross_attention_dim": 16, "norm_type": "ada_norm_single",
                                     "num_embeds_ada_norm": 1000},
    }  # fmt: skip
    extra = {"num_classes": 4} if cond == "class" else {}
    model = build_model(_cfg(cond=cond, diffusers_class=cls, diffusers_config=configs[cls], **extra)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    if cond == "text":
        real = Condition(tokens=torch.randn(2, 5, 24), mask=torch.ones(2, 5, dtype=torch.bool))
    else:
        real = Condition(labels=torch.tensor([1, 3]))
    null = real.null_like()
    if cond == "text":  # one zero token: the null condition's first token, without its padding
        null = Condition(tokens=null.tokens[:, :1], mask=null.mask[:, :1])
    with torch.no_grad():
        assert torch.allclose(model(x, t, None), model(x, t, null), atol=1e-6)
        assert (model(x, t, None) - model(x, t, real)).abs().max() > 1e-5


def test_token_merging_samples_a_diffusers_unet_backbone():
    """ToMe on a trained diffusers U-Net backbone (its grid probe runs the model unconditioned);
    ratio 0 leaves the samples as they are."""
    from attnlab.conditioning import Condition
    from attnlab.control.plan import sampling_plan

    unet = {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_head_dim": 4, "norm_num_groups": 8,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}  # fmt: skip
    cfg = _cfg(diffusers_class="UNet2DConditionModel", diffusers_config=unet)
    model = build_model(cfg).eval()
    c = Condition(tokens=torch.randn(2, 5, 24), mask=torch.ones(2, 5, dtype=torch.bool))

    def draw(spec):
        plan = sampling_plan(spec)
        with plan.installed(model):
            return sample(
                model, cfg.sample_shape(2), c, scheduler=make_scheduler("ddim"), steps=2, seeds=[0, 1]
            )

    plain = draw({})
    assert torch.equal(draw({"tome": {"ratio": 0.0}}), plain)
    merged = draw({"tome": {"ratio": 0.5, "max_downsample": None}})
    assert merged.shape == plain.shape and (merged - plain).abs().max() > 1e-6
