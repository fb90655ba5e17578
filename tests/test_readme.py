"""The README's commands and paths exist, and its example (train, sample, Python API) runs, tiny."""

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from attnlab.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TINY = [
    "train.steps=2",
    "train.batch_size=4",
    "train.log_every=1",
    "train.ckpt_every=2",
    "train.progress=false",
    "model.width=16",
]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands(program: str) -> list[list[str]]:
    lines = [line.split("#")[0].strip() for block in _blocks("bash") for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith(program + " ")]


def test_quick_start_targets_exist_in_the_makefile():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    used = {cmd[1] for cmd in _commands("make")}
    assert used == {"demo", "test"} and used <= targets
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_path_the_readme_names_exists():
    for path in set(re.findall(r"\b(examples/[\w.-]+\.yaml)", README)):
        assert (ROOT / path).is_file(), path
    known = {c.name or c.callback.__name__ for c in app.registered_commands}
    known |= {g.name for g in app.registered_groups}
    for cmd in _commands("attnlab"):
        assert cmd[1] in known, cmd


def test_every_example_run_config_is_listed_in_the_readme():
    for path in (ROOT / "examples").glob("*.yaml"):
        if path.name.startswith("poc-"):
            continue  # proof-of-concept configs, documented with `attnlab poc`
        assert path.name in README, path.name


def _attnlab(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{args}\n{result.output}{result.exception!r}"


def test_readme_digits_example_runs(tmp_path, monkeypatch):
    """The README's digits commands and its Python block, with a two-step training run."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    commands = _commands("attnlab")
    train = next(c for c in commands if c[1] == "train" and c[-1] == "runs/digits")
    _attnlab([*train[1:3], *TINY, *train[3:]])
    sample = next(c for c in commands if c[1] == "sample" and c[2] == "runs/digits")
    _attnlab([a if a != "50" else "2" for a in sample[1:]])  # fewer sampling steps
    regen = next(c for c in commands if c[1] == "regenerate")
    _attnlab(regen[1:])
    scope = {}
    block = next(b for b in _blocks("python") if "load_model" in b)
    exec(block.replace("steps=50", "steps=2"), scope)
    assert scope["x"].shape == (2, 1, 16, 16)


def test_readme_pipeline_example_runs():
    """The README's block on a diffusers pipeline, on a tiny random-weight Stable Diffusion."""
    import diffusers_tiny
    import torch

    block = next(b for b in _blocks("python") if "control(pipe" in b)
    scope = {"pipe": diffusers_tiny.sd(), "g": torch.Generator().manual_seed(0)}
    exec(block.replace("num_inference_steps=25", "num_inference_steps=2"), scope)
    assert scope["image"].size == (32, 32) and scope["maps"].count > 0
