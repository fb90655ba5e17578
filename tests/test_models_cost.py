"""Cost of a model config: FLOPs see the techniques (ToMe's saving matches its closed form), the
memory peaks hold what must be alive at once, and `attnlab cost` prints and writes them."""

import json

import pytest
import torch
from models_util import tiny_config
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.evaluate.cost import count_parameters
from attnlab.models import build_model
from attnlab.models.cost import example_inputs, model_cost
from attnlab.models.techniques.tome import merge_count

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tome_saving_in_a_whole_dit_is_its_per_layer_closed_form():
    cfg = tiny_config("dit", 2, "class", depth=3)
    tome = tiny_config("dit", 2, "class", depth=3, techniques={"tome": {"ratio": 0.5}})
    base_flops = model_cost(build_model(cfg), cfg, memory=False)["flops_per_call"]
    tome_flops = model_cost(build_model(tome), tome, memory=False)["flops_per_call"]
    c, grid = cfg.width, (cfg.size // cfg.patch,) * 2  # 4 x 4 tokens of width 32
    n, r = 16, merge_count(grid, 0.5, 2)
    sources, dests = 12, 4

    def layer(m):  # q, k, v and output projections + scores and weighted sum, one sample
        return 2 * m * c * 4 * c + 4 * m * m * c

    saved_per_block = layer(n) - layer(n - r) - 2 * sources * dests * c
    assert base_flops - tome_flops == cfg.depth * saved_per_block > 0


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_memory_peaks_hold_what_must_be_alive(backbone):
    cfg = tiny_config(backbone, 2, "text")
    model = build_model(cfg)
    out = model_cost(model, cfg, batch=4)
    params = count_parameters(model)
    assert out["params"] == params and out["gflops_per_call"] == out["flops_per_call"] / 1e9 > 0
    assert out["train_step_peak_bytes"] >= 4 * params  # every gradient exists at the end of backward
    x = example_inputs(cfg, 4).x
    assert out["sample_step_peak_bytes"] >= 2 * x.numel() * 4  # the CFG batch's output, float32
    assert out["train_step_peak_bytes"] > out["sample_step_peak_bytes"]


def test_example_inputs_follow_the_config():
    cfg = tiny_config("dit", 1, "text")
    inp = example_inputs(cfg, 3, text_tokens=5)
    assert inp.x.shape == (3, 2, 32) and inp.t.shape == (3,)
    assert inp.cond.tokens.shape == (3, 5, cfg.context_dim) and inp.cond.mask.all()
    assert example_inputs(tiny_config("unet", 2), 2).cond is None


def test_cost_command_prints_and_writes_the_numbers(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "data:\n  name: shapes\n  size: 16\nmodel:\n  backbone: dit\n  width: 32\n  depth: 2\n  heads: 2\n"
        "  patch: 4\n  cond: class\n"
    )
    runner = CliRunner()
    out = tmp_path / "cost.json"
    before = torch.get_num_threads()
    try:
        result = runner.invoke(
            app,
            ["cost", str(cfg), "model.techniques={tome: {ratio: 0.5}}", "--batch", "2", "--json", str(out)],
        )
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    assert "techniques: tome" in result.output and "GFLOPs / denoiser call" in result.output
    assert "peak memory, training step" in result.output
    record = json.loads(out.read_text())
    assert record["config"]["model"]["techniques"] == {"tome": {"ratio": 0.5}}
    assert record["flops_per_call"] > 0 and record["train_step_peak_bytes"] > 0 and record["batch"] == 2

    bad = runner.invoke(app, ["cost", str(cfg), "model.techniques={attention_gate: {}}", "--no-memory"])
    assert bad.exit_code == 2
    lines = bad.output.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("error: ") and "model.techniques.attention_gate" in lines[0]
    )
