"""`attnlab evaluator train` on a small folder dataset, labelled and unlabelled."""

import json

import numpy as np
import pytest
from chance import chance_ceiling
from PIL import Image
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.errors import ConfigError
from attnlab.evaluate import Evaluator, alignment, fid_kid

COLOURS = {"red": (230, 30, 30), "green": (30, 220, 40), "blue": (40, 60, 240)}


def _folder(root, labelled=True, n=36, held_out=0):
    """n noisy solid-colour patches for training, then `held_out` more in the eval split (without a
    split column the folder holds out a share of the n)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n + held_out):
        name = list(COLOURS)[i % 3]
        pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        row = {
            "file_name": f"img/{i}.png",
            "text": f"a {name} patch",
            **({"label": name} if labelled else {}),
        }
        rows.append({**row, "split": "train" if i < n else "eval"} if held_out else row)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _train(root, out):
    args = ["evaluator", "train", "--data-root", str(root), "--out", str(out), "--size", "8", "--steps", "30"]
    return CliRunner().invoke(app, [*args, "--batch-size", "16", "--threads", "1"])


def test_labelled_folder_gets_a_class_evaluator(tmp_path):
    _folder(tmp_path / "data", held_out=90)
    result = _train(tmp_path / "data", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    ev = Evaluator.load(tmp_path / "ev")
    assert ev.task.kind == "classes" and ev.task.vocab["label"] == ["blue", "green", "red"]
    held_out = ev.info["metrics"]["folder-8"]  # scored on the eval rows, which training never drew
    assert held_out["n"] == 90
    # solid colours: easy even in 30 steps
    assert held_out["class_acc"] >= 0.9 > chance_ceiling(90, 3, [i % 3 for i in range(36, 126)]), held_out
    shown = CliRunner().invoke(app, ["evaluator", "show", str(tmp_path / "ev")])
    assert shown.exit_code == 0 and "classes evaluator" in shown.output and "class_acc" in shown.output


def test_unlabelled_folder_gets_features_only(tmp_path):
    _folder(tmp_path / "data", labelled=False)
    assert _train(tmp_path / "data", tmp_path / "ev").exit_code == 0
    ev = Evaluator.load(tmp_path / "ev")
    assert ev.task.kind == "pretext"
    x = __import__("torch").rand(6, 3, 8, 8) * 2 - 1
    assert abs(fid_kid(x, x, ev.feature_net(), kid_subset_size=3)["fid"]) < 1e-6
    with pytest.raises(ConfigError, match="predicts no labels"):
        alignment("folder", x, [0] * 6, ev)


def test_a_missing_folder_is_one_line(tmp_path):
    result = _train(tmp_path / "nope", tmp_path / "ev")
    assert result.exit_code == 2
    assert "is not a directory" in result.output and "Traceback" not in result.output
