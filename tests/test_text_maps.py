"""Heat maps of generated tokens on condition tokens: from cross-attention (each row a distribution
over the condition tokens) or from the condition block of in-context self-attention (a share of
the row), recorded on the conditional rows only; and the text PoC end to end (slow)."""

import json

import pytest
import torch
from tokens_util import tiny_tokens

from attnlab.attention import control
from attnlab.conditioning import Condition
from attnlab.control.token_maps import TokenMaps
from attnlab.diffusion.masked import sample_tokens

MASK, V, L = 1, 12, 8


def model(techniques=None):
    return tiny_tokens(V, L, techniques=techniques, noise=0.2).eval()


COND = Condition(
    tokens=torch.tensor([[1, 2, 3], [4, 5, 0]]), mask=torch.tensor([[True] * 3, [True, True, False]])
)


def test_cross_attention_maps_are_distributions_over_the_condition():
    m, rec = model(), TokenMaps()
    with control(m, [rec]):
        sample_tokens(m, (2, L), COND, mask_id=MASK, steps=3, guidance=2.0, seeds=[0, 1])
    maps = rec.mean()
    assert maps.shape == (2, L, 3) and rec.source == "cross-attention"
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, L))
    assert (maps[1, :, 2] == 0).all()  # the padding token gets no attention
    assert rec.count == 3 * 2  # 3 steps x 2 layers, the unconditional rows left out


def test_in_context_maps_are_the_condition_block_of_self_attention():
    m, rec = model({"in_context": {}}), TokenMaps()
    with control(m, [rec]):
        sample_tokens(m, (2, L), COND, mask_id=MASK, steps=2, seeds=[0, 1])
    maps = rec.mean()
    assert maps.shape == (2, L, 3) and "in-context" in rec.source
    share = maps.sum(-1)
    assert (share > 0).all() and (share < 1).all()  # the rest of each row is on the sequence itself
    assert (maps[1, :, 2] == 0).all()


@pytest.mark.slow
def test_the_text_poc_runs_resumes_and_reports(tmp_path):
    from pathlib import Path

    from attnlab.poc.text import run_text_poc

    example = Path(__file__).resolve().parents[1] / "examples" / "poc-text.yaml"
    tiny = [
        "base.data.num=128",
        "base.data.num_eval=16",
        "base.data.num_ref=32",
        "base.model.width=32",
        "base.model.depth=2",
        "base.train.steps=4",
        "base.train.log_every=2",
        "base.train.ckpt_every=2",
        "base.reference_lm_steps=3",
        "num_samples=6",
        "workers=1",
    ]
    out = tmp_path / "poc"
    results = run_text_poc(example, out, tiny, log=lambda *a: None)
    assert set(results["per_seed"]) == {v["name"] for v in results["variants"]}
    report = (out / "report.md").read_text()
    assert "| reference |" in report and "*eval text (floors)*" in report and "Samples side by side" in report
    assert "from cross-attention" in report and "in-context" in report
    assert "reference LM: shipped scenes LM" in report  # the built-in set is scored by the shipped LM
    lines = (out / "samples" / "pag-seed1.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["techniques"]["sampling"] == {"pag": {"scale": 1.0}}
    before = (out / "runs" / "reference-seed0" / "model.safetensors").stat().st_mtime_ns
    run_text_poc(example, out, tiny, log=lambda *a: None)  # a rerun trains and scores nothing again
    assert (out / "runs" / "reference-seed0" / "model.safetensors").stat().st_mtime_ns == before
