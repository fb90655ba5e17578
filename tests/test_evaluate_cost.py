"""Cost measurements: FLOPs against closed forms, peak memory of known allocations, the loss log."""

import json

import pytest
import torch
from torch import nn

from attnlab.attention import Attention
from attnlab.errors import CheckpointError
from attnlab.evaluate import cost, count_flops, count_parameters, denoiser_flops, peak_memory, training_time


class ConvDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x, t, cond=None):
        return self.out(torch.relu(self.conv(x)))


def test_conv_flops_match_the_closed_form():
    model = ConvDenoiser()
    h = w = 16
    expected = 2 * (3 * 8 * 9 + 8 * 3) * h * w  # 2 FLOPs per multiply-add, biases not counted
    assert denoiser_flops(model, (3, h, w)) == expected
    assert count_parameters(model) == 3 * 8 * 9 + 8 + 8 * 3 + 3


def test_fused_attention_counts_as_the_explicit_path():
    torch.manual_seed(0)
    attn = Attention(32, heads=4)
    x = torch.randn(2, 64, 32)
    fused = count_flops(lambda: attn(x))
    explicit = count_flops(lambda: attn.forward_math(x))
    assert fused == explicit
    assert fused > count_flops(lambda: attn.to_qkv(x)) + count_flops(lambda: attn.to_out(x))


def test_peak_memory_sees_temporaries_freed_before_the_end():
    def run():
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 4 MB
        del a, b
        return torch.ones(500, 1000)  # 2 MB, alive at the end

    peak = peak_memory(run)
    assert 8_000_000 <= peak < 9_000_000


def test_peak_memory_holds_back_the_profiler_log_lines_only(capfd):
    import os

    def run():
        torch.ones(1000) * 2
        os.write(2, b"a real warning from C++\n")

    assert peak_memory(run) > 0
    err = capfd.readouterr().err
    assert "a real warning from C++" in err
    assert "profiler_start" not in err and "USDT" not in err


def test_training_time_reads_the_last_record_and_skips_a_cut_line(tmp_path):
    lines = [
        {"step": 50, "loss": 0.5, "images_per_s": 100.0, "wall": 10.0},
        {"step": 100, "loss": 0.4, "images_per_s": 300.0, "wall": 25.5},
    ]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 15')
    assert training_time(tmp_path) == {"train_seconds": 25.5, "train_steps": 100, "samples_per_s": 200.0}
    with pytest.raises(CheckpointError, match="no loss log"):
        training_time(tmp_path / "missing")


def test_cost_with_a_sampler(tmp_path):
    model = ConvDenoiser()

    def sampler():
        x = torch.randn(4, 3, 8, 8)
        for t in (750.0, 250.0):  # two denoiser calls per sample
            x = x - 0.1 * model(x, torch.full((4,), t))
        return x

    out = cost(model, (3, 8, 8), sampler=sampler, n_samples=4)
    assert out["flops_per_sample"] == pytest.approx(2 * out["flops_per_call"])
    assert out["latency_s"] > 0 and out["peak_mem_bytes"] > 0
    assert set(out) == {"params", "flops_per_call", "flops_per_sample", "latency_s", "peak_mem_bytes"}


def test_flops_are_counted_through_gradients_taken_inside_sampling():
    lin = nn.Linear(4, 4, bias=False)

    def run():  # the shape of Attend-and-Excite: a gradient step on the latent inside sampling
        with torch.enable_grad():
            x = torch.randn(2, 4, requires_grad=True)
            (grad,) = torch.autograd.grad(lin(x).sum(), x)
        return grad

    forward = 2 * 2 * 4 * 4
    assert count_flops(run) == 2 * forward  # forward matmul + the input-gradient matmul
