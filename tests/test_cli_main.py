"""The `attnlab` command: built-in commands, command modules of other rooms, dry runs, user errors."""

import json
import subprocess
import sys
import types

import pytest
import typer
from typer.testing import CliRunner

from attnlab.cli import main as cli_main
from attnlab.cli.main import app
from attnlab.data import DATASETS

runner = CliRunner()


def test_datasets_lists_every_dataset():
    result = runner.invoke(app, ["datasets"])
    assert result.exit_code == 0
    for name in DATASETS:
        assert any(line.startswith(name) for line in result.output.splitlines())


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


def test_command_modules_of_other_rooms_are_registered(monkeypatch):
    plugin = types.ModuleType("attnlab.cli.fake_room")
    plugin.register = lambda app: app.command("fake-room")(lambda: typer.echo("hello from a room"))
    monkeypatch.setitem(sys.modules, "attnlab.cli.fake_room", plugin)
    monkeypatch.setattr(cli_main, "PLUGINS", ("attnlab.cli.fake_room", "attnlab.cli.not_written_yet"))
    fresh = typer.Typer(cls=cli_main._Group)
    cli_main._register(fresh)  # a missing module is skipped
    result = runner.invoke(fresh, ["fake-room"])
    assert result.exit_code == 0 and result.output == "hello from a room\n"


def test_a_broken_command_module_is_not_hidden(monkeypatch):
    broken = types.ModuleType("attnlab.cli.broken_room")

    def register(app):
        import attnlab_missing_dependency  # noqa: F401

    broken.register = register
    monkeypatch.setitem(sys.modules, "attnlab.cli.broken_room", broken)
    monkeypatch.setattr(cli_main, "PLUGINS", ("attnlab.cli.broken_room",))
    with pytest.raises(ModuleNotFoundError, match="attnlab_missing_dependency"):
        cli_main._register(typer.Typer(cls=cli_main._Group))
