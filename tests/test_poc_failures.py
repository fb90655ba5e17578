"""A PoC that fails fails early and keeps what it finished: a bad file in the eval split stops it
before any training, and a side-by-side training process that fails names its variant while the
other variants' training is kept."""

import json

import pytest
from PIL import Image
from poc_util import ATTN16, BASE, BUDGET, load_poc, tiny_poc

import attnlab.poc.training as poc_training
from attnlab.poc import run_poc

VARIANTS = [BASE, ATTN16]


def poc_config(tmp_path, data, **changes):
    budget = {**BUDGET, "num_samples": 2, "batch_size": 2}
    cfg = {"data": data, "budget": budget, "variants": VARIANTS[:1], "metrics": ["cost"], "threads": 1}
    return load_poc(tmp_path, tiny_poc(**{**cfg, **changes}))


def image_folder(root, bad_eval: bool):
    """Six train and two eval images with captions; the last eval file is not an image if `bad_eval`."""
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(8):
        split = "train" if i < 6 else "eval"
        Image.new("RGB", (16, 16), (40 * i, 0, 255 - 40 * i)).save(root / "img" / f"{i}.png")
        rows.append({"file_name": f"img/{i}.png", "text": f"a square {i}", "split": split})
    if bad_eval:
        (root / "img" / "7.png").write_bytes(b"not a png")
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_a_bad_eval_file_stops_the_poc_before_any_training(tmp_path, monkeypatch):
    from attnlab.errors import DataError

    calls = []
    monkeypatch.setattr(poc_training, "train", lambda *a, **k: calls.append(a))
    root = image_folder(tmp_path / "folder", bad_eval=True)
    cfg = poc_config(tmp_path, {"name": "folder", "root": str(root), "size": 16})
    with pytest.raises(DataError, match="img/7.png"):
        run_poc(cfg, tmp_path / "out", progress=False, echo=lambda line: None)
    assert calls == [] and not (tmp_path / "out" / "variants").exists()


def test_side_by_side_failure_names_the_variant_and_keeps_the_others(tmp_path):
    """attn16's checkpoint directory cannot be made (a file is in its place), which only its training
    process finds out; base trains to the end beside it, heads4 (queued behind them) still trains,
    and a rerun trains attn16 alone."""
    from attnlab.errors import ConfigError
    from attnlab.train.checkpoint import latest_checkpoint

    data = {"name": "shapes", "size": 16, "num": 16, "num_eval": 8}
    third = {"name": "heads4", "model": {"heads": 4}, "level": 2}
    cfg = poc_config(tmp_path, data, variants=[*VARIANTS, third])
    cfg.budget.train_processes = 2
    out = tmp_path / "out"
    blocker = out / "variants" / "attn16" / "model" / "checkpoints"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")
    with pytest.raises(ConfigError, match=r"training variant 'attn16' failed: \w+Error: .*checkpoints") as e:
        run_poc(cfg, out, progress=False, echo=lambda line: None)
    assert "base" not in str(e.value) and "heads4" not in str(e.value)
    for name in ("base", "heads4"):
        kept = out / "variants" / name
        assert (kept / "stages" / "trained.json").is_file()
        assert latest_checkpoint(kept / "model").name == "step-0000002"

    blocker.unlink()
    lines = []
    results = run_poc(cfg, out, progress=False, echo=lines.append)
    assert not any("side by side" in line for line in lines)  # only attn16 was left to train
    assert [v["name"] for v in results["variants"]] == ["base", "attn16", "heads4"]
