"""`attnlab train` + `attnlab sample` on the built-in point clouds: a PLY and a two-view preview per
sample, each carrying its provenance, and techniques that do not take point data refused."""

import numpy as np
import pytest
from plyfile import PlyData
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.samples import read_provenance

pytestmark = pytest.mark.slow  # training a model through the CLI: tens of seconds on a busy machine
runner = CliRunner()
TINY = [
    "data.size=64",
    "data.num=16",
    "data.num_eval=4",
    "model.width=16",
    "model.depth=1",
    "model.heads=2",
    "model.patch=8",
    "model.groups=8",
    "model.cond=class",
    "train.batch_size=4",
    "train.steps=2",
    "train.log_every=1",
    "train.ckpt_every=2",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("points")
    result = runner.invoke(app, ["train", "examples/points-dit.yaml", *TINY, "--out", str(root / "run")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return root


def test_sample_writes_ply_and_preview_with_provenance(run):
    out = run / "samples"
    result = runner.invoke(
        app, ["sample", str(run / "run"), "--label", "2", "--num", "2", "--steps", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 2 samples" in result.output
    plys, pngs = sorted(out.glob("*.ply")), sorted(out.glob("*.png"))
    assert len(plys) == 2 and [p.stem for p in plys] == [p.stem for p in pngs]
    v = PlyData.read(str(plys[0]))["vertex"].data
    assert len(v) == 64 and np.isfinite(np.stack([v["x"], v["y"], v["z"]])).all()
    meta = read_provenance(plys[0])
    assert meta == read_provenance(pngs[0]) and meta["label"] == 2 and meta["seed"] == 0


def test_a_technique_without_points_is_refused_with_its_reason(run):
    result = runner.invoke(
        app, ["sample", str(run / "run"), "--label", "1", "-t", "sag", "--out", str(run / "x")]
    )
    assert result.exit_code == 2
    assert "technique 'sag' does not take points data" in result.output and "no grid to blur" in result.output
