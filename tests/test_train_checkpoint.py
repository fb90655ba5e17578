"""Model directories: bit-exact round trip, one-call loading, and a CheckpointError naming each bad file."""

import json
import shutil

import pytest
import torch

from attnlab.config import load_config
from attnlab.errors import CheckpointError
from attnlab.models import build_model
from attnlab.train import latest_checkpoint, load_model
from attnlab.train.checkpoint import read_optimizer_state, save_checkpoint


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint written from a randomly initialised model with an optimizer state."""
    cfg = load_config(None, ["model.width=16", "model.channel_mult=[1,2]", "model.cond=text"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), None).pow(2).mean().backward()
    opt.step()
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    run = tmp_path_factory.mktemp("run")
    ckpt = save_checkpoint(run, 3, cfg, model, ema, opt.state_dict(), {"log_bytes": 0, "wall": 0.0})
    return run, ckpt, cfg, model, ema, opt


def test_round_trip_is_bit_exact(saved):
    run, ckpt, cfg, model, ema, opt = saved
    assert latest_checkpoint(run) == ckpt
    raw, cfg2 = load_model(run, ema=False)
    assert cfg2 == cfg
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in raw.state_dict().items())
    averaged, _ = load_model(ckpt)  # ema=True by default
    assert all(torch.equal(v, ema[k]) for k, v in averaged.state_dict().items())
    state = read_optimizer_state(ckpt / "optimizer.safetensors")
    fresh = torch.optim.AdamW(build_model(cfg.model).parameters(), lr=1e-3)
    fresh.load_state_dict(state)
    for i, s in opt.state_dict()["state"].items():
        assert all(torch.equal(v, fresh.state_dict()["state"][i][k]) for k, v in s.items())


def _broken(saved, tmp_path, name):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved[1], ckpt)
    return ckpt, ckpt / name


def test_missing_weights(saved, tmp_path):
    ckpt, f = _broken(saved, tmp_path, "ema.safetensors")
    f.unlink()
    with pytest.raises(CheckpointError, match=r"ema.safetensors: missing .*--no-ema"):
        load_model(ckpt)


def test_corrupt_weights(saved, tmp_path):
    ckpt, f = _broken(saved, tmp_path, "model.safetensors")
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        load_model(ckpt, ema=False)


def test_bad_json(saved, tmp_path):
    ckpt, f = _broken(saved, tmp_path, "config.json")
    f.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        load_model(ckpt)


def test_config_with_a_bad_value(saved, tmp_path):
    ckpt, f = _broken(saved, tmp_path, "config.json")
    d = json.loads(f.read_text())
    d["model"]["backbone"] = "vit"
    f.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"config.json: model.backbone"):
        load_model(ckpt)


def test_shape_mismatch(saved, tmp_path):
    ckpt, f = _broken(saved, tmp_path, "config.json")
    d = json.loads(f.read_text())
    d["model"]["width"] = 32  # the weights are for width 16
    f.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"ema.safetensors: shape mismatch with the model"):
        load_model(ckpt)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such model directory"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "checkpoints" / ".tmp-step-0000004-x").mkdir(parents=True)  # only a half-written save
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_model(tmp_path)
