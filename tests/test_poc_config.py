"""PoC configs: a bad value is one ConfigError naming its key; variants resolve to the right model."""

import pytest
import yaml
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.errors import ConfigError
from attnlab.poc import load_poc_config
from attnlab.poc.variants import model_owner, own_levels, sampling_spec

BASE = {
    "data": {"name": "shapes", "size": 16, "num": 32, "num_eval": 16},
    "model": {"cond": "text", "width": 16, "channel_mult": [1, 2], "attn_resolutions": [8], "heads": 2},
    "budget": {"train_steps": 10},
    "variants": [{"name": "base"}, {"name": "pag", "base": "base", "techniques": {"pag": {"scale": 2.0}}}],
}


def write(tmp_path, **changes):
    path = tmp_path / "poc.yaml"
    path.write_text(yaml.safe_dump({**BASE, **changes}))
    return path


def error_of(tmp_path, overrides=(), **changes) -> str:
    with pytest.raises(ConfigError) as e:
        load_poc_config(write(tmp_path, **changes), list(overrides))
    return str(e.value)


def test_a_good_config_resolves_models_and_techniques(tmp_path):
    variants = BASE["variants"] + [
        {"name": "tgate", "techniques": {"tgate": None}},
        {"name": "wide", "model": {"width": 32}, "level": 2},
        {"name": "wide-pag", "base": "wide", "techniques": {"pag": {}}},
    ]
    cfg = load_poc_config(write(tmp_path, variants=variants), ["budget.num_samples=8"])
    owners = {v.name: model_owner(cfg, v).name for v in cfg.variants}
    # same architecture -> one model; a base or a changed model decides otherwise
    assert owners == {"base": "base", "pag": "base", "tgate": "base", "wide": "wide", "wide-pag": "wide"}
    assert cfg.model.size == 16 and cfg.model.in_channels == 3  # facts of the data
    assert sampling_spec(cfg, cfg.variant("wide-pag")) == {"pag": {}}
    assert [own_levels(cfg, v) for v in cfg.variants] == [[], [5], [3], [2], [5]]
    assert cfg.budget.num_samples == 8 and cfg.reference_name == "base"


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"seeds": [0, 1]}, "seeds=[0, 1] is not allowed: expected at least 3 distinct sampling seeds"),
        ({"seeds": [0, 0, 1]}, "seeds"),
        ({"priority": "cheap"}, "priority"),
        ({"metrics": ["fid", "beauty"]}, "metrics"),
        (
            {"data": {"name": "digits"}, "metrics": ["fid", "localisation"]},
            "'localisation' (heat-map IoU of words with object masks) only for text models on shapes or points",
        ),
        ({"budget": {"train_steps": 10, "train_minutes": 5}}, "budget.train_steps"),
        ({"budget": {"train_steps": 10, "train_processes": -1}}, "budget.train_processes"),
        ({"budget": {}}, "exactly one of budget.train_steps and budget.train_minutes"),
        ({"budget": {"train_steps": 10, "num_samples": 1}}, "budget.num_samples"),
        ({"variants": []}, "variants"),
        ({"reference": "nope"}, "reference='nope'"),
        (
            {"train": {"steps": 100}},
            "train.steps is not a PoC key: set the training budget with budget.train_steps",
        ),
        ({"model": {"cond": "text", "techniques": {"x": {}}}}, "model.techniques is not a PoC key"),
        ({"variants": [{"name": "a b"}]}, "variants[0].name='a b'"),
        ({"variants": [{"name": "a"}, {"name": "a"}]}, "variants[1].name='a'"),
        (
            {"variants": [{"name": "a", "techniques": {"nope": {}}}]},
            "variants[0].techniques.nope: unknown technique 'nope'",
        ),
        (
            {"variants": [{"name": "a", "techniques": {"pag": {"strength": 2}}}]},
            "variants[0].techniques.pag: technique 'pag' has no option",
        ),
        ({"variants": [{"name": "a", "techniques": {"p2p": {}}}]}, "use `attnlab edit`"),
        ({"variants": [{"name": "a", "base": "b"}, {"name": "b", "base": "a"}]}, "cycle"),
        (
            {"variants": [{"name": "a"}, {"name": "b", "base": "a", "model": {"width": 32}}]},
            "variants[1].model",
        ),
        ({"variants": [{"name": "a", "model": {"width": 31}}]}, "variants[0]: model.heads"),
        ({"variants": [{"name": "a", "level": 7}]}, "variants[0].level=7"),
        (
            {"train_seeds": [0, 1, 0]},
            "train_seeds=[0, 1, 0] is not allowed: expected training seeds without repeats",
        ),
        ({"train_seeds": []}, "train_seeds=[] is not allowed: expected at least one training seed"),
        ({"train_seeds": [0, -1]}, "train_seeds=[0, -1]"),
        ({"train_seeds": [0, "one"]}, "train_seeds"),
        (
            {"seeds": [0, 1, 2, 1]},
            "seeds=[0, 1, 2, 1] is not allowed: expected sampling seeds without repeats",
        ),
        ({"variants": [{"nam": "a"}]}, "'nam'"),
        ({"variants": [{"techniques": {}}]}, "variants[0].name"),
    ],
)
def test_bad_values_name_their_key(tmp_path, changes, expected):
    assert expected in error_of(tmp_path, **changes)


@pytest.mark.parametrize(
    "section",
    [{"train": {"lr": -1}}, {"train": {"ckpt_every": 7}}, {"diffusion": {"cond_drop": 1.5}}],
    ids=["train.lr", "train.ckpt_every", "diffusion.cond_drop"],
)
def test_train_and_diffusion_are_refused_as_in_a_run_config(tmp_path, section):
    from attnlab.config import load_config

    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(section))
    with pytest.raises(ConfigError) as e:
        load_config(run)
    expected = str(e.value).removeprefix(f"{run}: ")  # e.g. "train.lr=-1.0 is not allowed: expected ..."
    assert expected.startswith(next(iter(section))) and "is not allowed" in expected
    assert error_of(tmp_path, **section) == f"{tmp_path / 'poc.yaml'}: {expected}"


def test_text_only_techniques_need_a_text_model(tmp_path):
    model = {**BASE["model"], "cond": "class"}
    msg = error_of(tmp_path, model=model, variants=[{"name": "a", "techniques": {"heatmaps": {}}}])
    assert "variants[0].techniques.heatmaps" in msg and "text-conditioned" in msg


def test_overrides_are_checked_like_the_file(tmp_path):
    with pytest.raises(ConfigError, match="override 'budget' is not of the form key=value"):
        load_poc_config(write(tmp_path), ["budget"])
    with pytest.raises(ConfigError, match="budget.sample_steps"):
        load_poc_config(write(tmp_path), ["budget.sample_steps=0"])


def test_cli_prints_one_line_naming_the_key(tmp_path):
    result = CliRunner().invoke(app, ["poc", str(write(tmp_path, seeds=[1])), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and "seeds=[1]" in result.output
    assert "Traceback" not in result.output


def test_dry_run_lists_what_would_run(tmp_path):
    result = CliRunner().invoke(app, ["poc", str(write(tmp_path)), "--out", str(tmp_path / "o"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "samples base's model" in result.output and (tmp_path / "o" / "poc.json").is_file()
    assert not (tmp_path / "o" / "variants").exists()
    assert "training seeds: 0 (1 model(s) x 1 = 1 training run(s))" in result.output  # train.seed alone
    seeded = write(tmp_path, train_seeds=[3, 4], train={"seed": 9})
    result = CliRunner().invoke(app, ["poc", str(seeded), "--out", str(tmp_path / "o2"), "--dry-run"])
    assert "training seeds: 3, 4 (1 model(s) x 2 = 2 training run(s))" in result.output, result.output


def test_default_prompts_come_from_the_eval_split_with_their_ground_truth(tmp_path):
    from attnlab.data import build_dataset
    from attnlab.poc.prompts import poc_prompts

    cfg = load_poc_config(write(tmp_path), ["budget.num_samples=6"])
    ds = build_dataset(cfg.data, "eval")
    a, b = poc_prompts(cfg, ds), poc_prompts(cfg, ds)
    assert a.texts == b.texts and len(a) == 6 and set(a.texts) <= set(ds.texts())
    for text, req in zip(a.texts, a.requests):
        obj = req["objects"][0]
        assert text == f"a {obj['color']} {obj['shape']}" and req["count"] == 1


def test_given_prompts_and_class_names(tmp_path):
    from attnlab.data import build_dataset
    from attnlab.poc.prompts import poc_prompts

    cfg = load_poc_config(
        write(tmp_path, prompts=["a red circle", "a blue square"]), ["budget.num_samples=3"]
    )
    p = poc_prompts(cfg, build_dataset(cfg.data, "eval"))
    assert p.texts == ["a red circle", "a blue square", "a red circle"]
    assert p.requests[1]["objects"] == [{"shape": "square", "color": "blue"}]
    model = {**BASE["model"], "cond": "class"}
    cfg = load_poc_config(
        write(tmp_path, model=model, prompts=["red circle", "blue square"]), ["budget.num_samples=2"]
    )
    p = poc_prompts(cfg, build_dataset(cfg.data, "eval"))
    assert p.texts == [None, None] and p.shown == ["red circle", "blue square"]
    assert [r["objects"][0]["color"] for r in p.requests] == ["red", "blue"]
    cfg = load_poc_config(write(tmp_path, model=model, prompts=["red circles"]), ["budget.num_samples=2"])
    with pytest.raises(ConfigError, match="'red circles' is not a class of shapes"):
        poc_prompts(cfg, build_dataset(cfg.data, "eval"))
