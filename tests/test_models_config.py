"""ModelConfig: bad values name their field and what is allowed; presets build; dicts round-trip."""

import json

import pytest

from attnlab.errors import ConfigError
from attnlab.models import PRESETS, ModelConfig, build_model, preset


@pytest.mark.parametrize(
    "kw, field, allowed",
    [
        ({"backbone": "vit"}, "model.backbone", "unet, dit"),
        ({"dims": 3}, "model.dims", "1 (audio) or 2"),
        ({"cond": "mask"}, "model.cond", "none, class, text"),
        ({"heads": 5}, "model.heads", "divisor of width=64"),
        ({"attn_resolutions": (8, 6)}, "model.attn_resolutions", "[16, 8, 4]"),
        ({"size": 18}, "model.size", "multiple of 4"),
        ({"cond": "class", "num_classes": 0}, "model.num_classes", "at least 1"),
        ({"width": 0}, "model.width", "positive integer"),
        ({"channel_mult": 2}, "model.channel_mult", "list of positive integers"),
        ({"backbone": "dit", "width": 30, "heads": 3}, "model.width", "multiple of 4"),
        ({"mlp_ratio": -1.0}, "model.mlp_ratio", ">= 0"),
        ({"techniques": {"tome": 0.5}}, "model.techniques", "name -> options"),
        ({"backbone": "dit", "patch": 3}, "model.patch", "divisor of size=16"),
    ],
)
def test_bad_value_names_the_field_and_the_allowed_values(kw, field, allowed):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kw)
    assert field in str(err.value) and allowed in str(err.value)


def test_unknown_key_and_unknown_preset_are_named():
    with pytest.raises(ConfigError, match="model.widht is not a model option"):
        ModelConfig.from_dict({"widht": 32})
    with pytest.raises(ConfigError, match="unet-huge.*unet-tiny"):
        preset("unet-huge")


def test_a_technique_the_backbone_lacks_is_an_error_not_a_no_op():
    with pytest.raises(ConfigError, match="model.techniques.no_such_thing"):
        build_model(ModelConfig(techniques={"no_such_thing": {}}))


def test_dict_round_trip_through_json():
    cfg = ModelConfig(backbone="dit", cond="text", dims=1, size=64, patch=4, techniques={"x": {"a": 1}})
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.channel_mult, tuple)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    model = build_model(preset(name, cond="class", num_classes=4))
    assert model.config == preset(name, cond="class", num_classes=4)
