"""`attnlab rate` from the command line: the export, the report redraw, and one line for each bad
input (a folder that is not a finished PoC, a port in use, a ratings file that is not one), with
the ratings file left as it was."""

from __future__ import annotations

import csv
import socket

import pytest
from rate_util import copy_poc, shapes_poc
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.rate import Pair, RatedPoc, Ratings

runner = CliRunner()


@pytest.fixture
def poc_dir(tmp_path, tmp_path_factory):
    return copy_poc(shapes_poc(tmp_path_factory.getbasetemp()), tmp_path / "poc")


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_export_and_report(poc_dir, tmp_path):
    poc = RatedPoc(poc_dir)
    ratings = Ratings.of(poc)
    for it, choice in zip(poc.items[:4], ("left", "right", "tie", "skip")):
        ratings.record("ann", "quality", Pair(it, "pag", "attn16"), choice)
    result = runner.invoke(app, ["rate", str(poc_dir), "--export", str(tmp_path / "votes.csv")])
    assert result.exit_code == 0 and "4 votes written" in result.output
    assert [r["choice"] for r in csv.DictReader((tmp_path / "votes.csv").open())] == [
        "left",
        "right",
        "tie",
        "skip",
    ]
    result = runner.invoke(app, ["rate", str(poc_dir), "--report"])
    assert result.exit_code == 0, result.output
    assert "4 votes" in result.output and "quality: Bradley-Terry score" in result.output
    assert "## Human preference" in (poc_dir / "report.md").read_text()


def test_a_folder_that_is_not_a_finished_poc(tmp_path, poc_dir):
    assert "no results.json" in _error_line(runner.invoke(app, ["rate", str(tmp_path)]))
    assert "no such folder" in _error_line(runner.invoke(app, ["rate", str(tmp_path / "nowhere")]))
    (poc_dir / "results.json").write_text("{not json")
    assert "not a PoC's results" in _error_line(runner.invoke(app, ["rate", str(poc_dir)]))


def test_a_port_in_use(poc_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = _error_line(runner.invoke(app, ["rate", str(poc_dir), "--port", str(port)]))
    assert f"port {port} on 127.0.0.1 is in use" in line and "--port" in line


def test_a_corrupt_ratings_file_is_named_and_left_whole(poc_dir):
    path = poc_dir / "ratings.sqlite"
    path.write_bytes(b"\x00\x01 not a database " * 64)
    before = path.read_bytes()
    for args in ([], ["--report"], ["--export", str(poc_dir / "v.csv")]):
        line = _error_line(runner.invoke(app, ["rate", str(poc_dir), "--port", "0", *args]))
        assert str(path) in line and "not an SQLite database" in line
    assert path.read_bytes() == before and not (poc_dir / "v.csv").exists()


def test_alignment_needs_a_prompt(tmp_path, poc_dir):
    import json

    results = json.loads((poc_dir / "results.json").read_text())
    results["config"]["model"]["cond"] = "none"
    (poc_dir / "results.json").write_text(json.dumps(results))
    line = _error_line(runner.invoke(app, ["rate", str(poc_dir), "--question", "alignment"]))
    assert "unconditional" in line
