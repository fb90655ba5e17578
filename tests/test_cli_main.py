"""The `attnlab` command: every room's command module registered, dry runs, user errors."""

import json
import subprocess
import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

from attnlab.cli import main as cli_main
from attnlab.cli.main import app
from attnlab.data import DATASETS, TEXT_SETS

runner = CliRunner()


def test_datasets_lists_every_dataset():
    result = runner.invoke(app, ["datasets"])
    assert result.exit_code == 0
    for name in (*DATASETS, *TEXT_SETS):
        assert any(line.startswith(name) for line in result.output.splitlines())


def test_datasets_lists_the_scenes_text_set_with_its_splits():
    from attnlab.data.scenes import ScenesConfig

    result = runner.invoke(app, ["datasets"])
    c = ScenesConfig()
    line = next(line for line in result.output.splitlines() if line.startswith("scenes"))
    assert "text" in line and f"train {c.num}, eval {c.num_eval}, ref {c.num_ref}" in line
    assert "modality: tokens" in result.output


def test_dry_run_writes_the_resolved_config(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data:\n  name: digits\nmodel:\n  cond: class\n  width: 16\n")
    result = runner.invoke(
        app, ["train", str(cfg), "model.heads=2", "--out", str(tmp_path / "run"), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["model"]["in_channels"] == 1 and resolved["model"]["num_classes"] == 10
    assert resolved["model"]["heads"] == 2 and resolved["train"]["steps"] > 0
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_errors_are_one_line_with_exit_code_2(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path / "none.yaml"), "--out", str(tmp_path)])
    assert (
        result.exit_code == 2 and result.output == f"error: {tmp_path / 'none.yaml'}: config file not found\n"
    )


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "attnlab",
            "train",
            str(tmp_path / "none.yaml"),
            "model.width=8",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")


def test_every_command_module_is_registered_and_adds_commands():
    package = Path(cli_main.__file__).parent
    modules = {p.stem for p in package.glob("*.py") if "def register(" in p.read_text()}
    assert {m.__name__.rsplit(".", 1)[1] for m in cli_main.COMMAND_MODULES} == modules
    for module in cli_main.COMMAND_MODULES:
        fresh = typer.Typer(cls=cli_main._Group)
        module.register(fresh)
        assert fresh.registered_commands or fresh.registered_groups, module.__name__
    shown = runner.invoke(app, ["--help"]).output
    for name in ("datasets", "train", "sample", "regenerate", "edit", "maps", "techniques", "poc"):
        assert name in shown, name
    assert "evaluator" in shown and "cost" in shown
