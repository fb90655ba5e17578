"""`attnlab train` / `attnlab sample` / `attnlab poc` on text (`modality: tokens`): the files a run
writes (tokenizer as JSON, weights as safetensors, the reference LM), samples as JSONL with
provenance on every line, a rerun skipped, and bad input refused with one message."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.train.text import load_text_run

runner = CliRunner()
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "text-mdlm.yaml"
TINY = [
    "data.num=128",
    "data.num_eval=16",
    "data.num_ref=32",
    "model.width=32",
    "model.depth=1",
    "model.heads=2",
    "train.steps=6",
    "train.batch_size=8",
    "train.log_every=3",
    "train.ckpt_every=3",
    "reference_lm_steps=3",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "run"
    result = CliRunner().invoke(app, ["train", str(EXAMPLE), *TINY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_a_text_run_writes_its_files(run):
    for name in ("config.json", "tokenizer.json", "conditions.json", "model.safetensors", "ema.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "reference_lm.safetensors").is_file() and (run / "reference_lm.json").is_file()
    json.loads((run / "tokenizer.json").read_text())  # the tokenizer is JSON, never a pickle
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["modality"] == "tokens" and cfg["model"]["backbone"] == "tokens"
    assert cfg["model"]["in_channels"] == load_text_run(run).data.tokenizer.vocab_size
    assert len((run / "log.jsonl").read_text().splitlines()) == 2


def test_training_again_skips_a_finished_run(run):
    before = (run / "model.safetensors").stat().st_mtime_ns
    result = runner.invoke(app, ["train", str(EXAMPLE), *TINY, "--out", str(run)])
    assert result.exit_code == 0 and "already trained" in result.output
    assert (run / "model.safetensors").stat().st_mtime_ns == before


def test_sample_writes_jsonl_with_provenance_per_line(run, tmp_path):
    out = tmp_path / "samples"
    result = runner.invoke(
        app, ["sample", str(run), "--num", "5", "--seed", "10", "--steps", "3", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and [r["seed"] for r in lines] == [10, 11, 12, 13, 14]
    for r in lines:
        assert {
            "text",
            "ids",
            "condition",
            "model_dir",
            "weights",
            "weights_sha256",
            "sampler",
            "steps",
        } <= set(r)
        assert r["steps"] == 3 and r["sampler"] == "ancestral" and isinstance(r["valid"], bool)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"valid", "agree", "distinct_2", "self_bleu_4", "gen_ppl"} <= set(metrics)
    assert metrics["gen_ppl_lm"].startswith("shipped")  # the built-in scenes set's shipped LM
    again = tmp_path / "again"  # the same command draws the same samples, in a smaller batch too
    runner.invoke(
        app,
        [
            "sample",
            str(run),
            "--num",
            "5",
            "--seed",
            "10",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--out",
            str(again),
        ],
    )
    redrawn = [json.loads(line) for line in (again / "samples.jsonl").read_text().splitlines()]
    assert [r["ids"] for r in redrawn] == [r["ids"] for r in lines]


def test_sample_with_a_technique_that_has_no_tokens_support_is_refused(run, tmp_path):
    result = runner.invoke(app, ["sample", str(run), "--sag", "1.0", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "technique 'sag' works on 1D/2D data, not tokens (on tokens: blurs" in result.output
    result = runner.invoke(app, ["sample", str(run), "--sampler", "ddim", "--out", str(tmp_path / "s")])
    assert (
        result.exit_code == 2
        and "--sampler='ddim' is not allowed: expected ancestral or confidence" in result.output
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.wings=2", "unknown key 'model.wings'"),
        ("data.name=poems", "data.name"),
        ("model.backbone=dit", "model.backbone='dit' is not allowed: expected tokens for a text run"),
        ("data.max_objects=5", "data.max_objects=5 is not allowed: expected 1 to 3"),
        ("diffusion.cond_drop=1.5", "diffusion.cond_drop=1.5 is not allowed"),
    ],
)
def test_bad_text_configs_are_refused_with_the_key(override, message, tmp_path):
    result = runner.invoke(app, ["train", str(EXAMPLE), override, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_sampling_an_incomplete_run_names_the_missing_file(run, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((run / "config.json").read_text())
    result = runner.invoke(app, ["sample", str(broken), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "is not a trained text run: tokenizer.json is missing" in result.output


def test_text_folder_run_trains_on_the_users_text(tmp_path):
    root = tmp_path / "mytext"
    root.mkdir()
    rows = [{"text": f"the {c} cat sat on mat {i}", "mood": c} for i, c in enumerate(["red", "blue"] * 30)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "folder.yaml"
    cfg.write_text(
        f"modality: tokens\ndata:\n  name: folder\n  root: {root}\n  condition_columns: [mood]\n"
        "  tokenizer: bpe\n  vocab_size: 120\nmodel:\n  backbone: tokens\n"
    )
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(cfg), *TINY[3:], "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["sample", str(out), "--num", "3", "--steps", "2", "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 0, result.output
    first = json.loads((tmp_path / "s" / "samples.jsonl").read_text().splitlines()[0])
    assert first["condition"][0].startswith("mood=") and "valid" not in first  # no grammar for user text
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["gen_ppl_lm"].startswith("trained on this run's ref split")  # user text: its own LM


def test_a_resumed_text_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    from safetensors.torch import load_file

    from attnlab.errors import ConfigError
    from attnlab.train.text import load_text_config, train_text

    def cfg(*extra):
        return load_text_config(EXAMPLE, [*TINY, "train.ckpt_every=3", *extra])

    quiet = lambda *a: None  # noqa: E731
    train_text(cfg("train.steps=6"), tmp_path / "straight", log=quiet)
    train_text(cfg("train.steps=3"), tmp_path / "resumed", log=quiet)  # stopped after its checkpoint
    train_text(cfg("train.steps=6"), tmp_path / "resumed", log=quiet)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [3, 6]
    with pytest.raises(ConfigError, match="different config .*model.width"):
        train_text(cfg("train.steps=9", "model.width=16"), tmp_path / "resumed", log=quiet)


def test_a_folder_eval_text_longer_than_any_train_text_and_an_eval_only_condition_fit(tmp_path):
    from attnlab.train.text import TextDataConfig, build_token_data

    rows = [
        {"text": "a cat", "split": "train", "mood": "glad"},
        {"text": "the cat sat down", "split": "eval", "mood": "new"},
        {"text": "a dog", "split": "ref", "mood": "glad"},
    ]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build_token_data(TextDataConfig(name="folder", root=str(tmp_path), condition_columns=["mood"]))
    assert data.tokenizer.length == 4 and data.ids["eval"].shape == (1, 4)
    assert data.conditions == ["[null]", "mood=glad", "mood=new"]
    assert data.tokenizer.decode(data.ids["eval"][0]) == ("cat", False)  # unknown words are [UNK]
