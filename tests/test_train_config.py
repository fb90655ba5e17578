"""The run config: YAML + overrides into typed dataclasses, one clear error per bad key, JSON round trip."""

import json
from pathlib import Path

import pytest

from attnlab.config import RunConfig, load_config
from attnlab.errors import ConfigError

# run configs (examples/poc-*.yaml are proof-of-concept configs, read by `attnlab poc`)
EXAMPLES = sorted(
    p for p in Path(__file__).resolve().parents[1].glob("examples/*.yaml") if not p.name.startswith("poc-")
)


def test_yaml_and_overrides_give_typed_values(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  width: 48\n  channel_mult: [1, 2]\ntrain:\n  lr: 0.01\n")
    cfg = load_config(f, ["model.width=64", "train.steps=7", "diffusion.min_snr_gamma=5"])
    assert cfg.model.width == 64 and cfg.model.channel_mult == (1, 2)  # override beats the file
    assert cfg.train.steps == 7 and cfg.train.lr == 0.01 and cfg.diffusion.min_snr_gamma == 5.0


def test_json_round_trip():
    cfg = load_config(None, ["model.cond=text", "model.attn_resolutions=[8,4]", "model.channel_mult=[1,2,2]"])
    d = json.loads(json.dumps(cfg.to_dict()))
    assert RunConfig.from_dict(d) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.widht=3", r"unknown key 'model.widht'; known keys of model: backbone, .*width"),
        ("trian.steps=3", r"unknown key 'trian"),
        ("model.width=abc", r"model.width: .*'abc'.*Integer"),
        ("diffusion.prediction=x0", r"diffusion.prediction: .*'x0'.*'epsilon', 'v_prediction'"),
        ("train.ckpt_every=7", r"train.ckpt_every=7 .*multiple of train.log_every"),
        ("diffusion.cond_drop=1.5", r"diffusion.cond_drop=1.5 .*\[0, 1\)"),
        ("data.size=17", r"data.size=17"),
        ("model.width", r"not of the form key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping"):
        load_config(bad)


def test_class_conditioning_takes_the_number_of_classes_from_the_data():
    assert load_config(None, ["data.name=digits", "model.cond=class"]).model.num_classes == 10


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_loads(path):
    from attnlab.train.text import is_text_config, load_text_config

    cfg = load_text_config(path) if is_text_config(path) else load_config(path)
    assert cfg.train.steps > 0
