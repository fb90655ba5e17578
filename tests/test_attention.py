"""The attention bus: SDPA == math path, padding mask, no-op controls, layer selection, composition."""

import pytest
import torch
from torch import nn

from attnlab.attention import Attention, Control, StepWindow, control, match_layer, name_layers, sampling_step


def _pair(seed=0):
    torch.manual_seed(seed)
    return Attention(32, heads=4), Attention(32, heads=4, context_dim=12)


def test_sdpa_equals_math_path():
    self_attn, cross = _pair()
    x, ctx = torch.randn(3, 10, 32), torch.randn(3, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(self_attn(x), self_attn.forward_math(x)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cross(x, ctx, mask), cross.forward_math(x, ctx, mask)[0], atol=1e-5, rtol=1e-5)


def test_padding_tokens_receive_no_attention():
    _, cross = _pair()
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    out, p = cross.forward_math(x, ctx, mask)
    assert torch.all(p[0, :, :, 2:] == 0) and torch.all(p[1, :, :, 3:] == 0)
    garbage = ctx.clone()
    garbage[0, 2:] = 1e3 * torch.randn(3, 12)  # changing padded tokens must change nothing
    torch.testing.assert_close(cross(x, garbage, mask), cross(x, ctx, mask))


def test_probabilities_sum_to_one():
    self_attn, _ = _pair()
    _, p = self_attn.forward_math(torch.randn(2, 7, 32))
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 7))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Attention(16, 2) for _ in range(12)])
        name_layers(self)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x, grid=(2, 3))
        return x


class Recorder(Control):
    def __init__(self, needs=False, **kw):
        self.calls, self.needs = [], needs
        self.__dict__.update(kw)

    def needs_probs(self, call):
        return self.needs

    def probs(self, call, p):
        self.calls.append((call.name, call.grid, call.step))
        return p


def test_noop_control_changes_nothing_and_paths_agree():
    net, x = Net(), torch.randn(2, 6, 16)
    ref = net(x)
    with control(net, [Recorder(needs=False), Recorder(needs=True)]) as (a, b):
        out = net(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert len(b.calls) == 12 and b.calls[0][1] == (2, 3)
    assert all(not blk.controls for blk in net.blocks)  # the scope removed everything


def test_layer_patterns_match_whole_parts():
    assert match_layer("blocks.1", "blocks.1.attn1")
    assert not match_layer("blocks.1", "blocks.10.attn1")
    assert match_layer("**.attn2", "down.0.attn2") and not match_layer("**.attn2", "down.0.attn1")
    assert match_layer("blocks.*", "blocks.10")
    net = Net()
    rec = Recorder(needs=True, layers="blocks.1")
    with control(net, rec):
        net(torch.randn(1, 6, 16))
    assert [c[0] for c in rec.calls] == ["blocks.1"]


def test_step_window_and_step_reported():
    net = Net()
    rec = Recorder(needs=True, layers="blocks.0", window=StepWindow(0.5, 1.0))
    with control(net, rec):
        for i in range(4):
            with sampling_step(net, i, 4, torch.tensor([999 - i])):
                net(torch.randn(1, 6, 16))
    assert [c[2] for c in rec.calls] == [2, 3]


def test_controls_compose_in_order():
    net = Net()

    class Scale(Control):
        def __init__(self, f, log):
            self.f, self.log = f, log

        def needs_probs(self, call):
            return True

        def probs(self, call, p):
            self.log.append(self.f)
            return p * self.f

    log = []
    with control(net, [Scale(2.0, log), Scale(0.5, log)]):
        out = net(torch.randn(1, 6, 16))
    assert log[:2] == [2.0, 0.5] and torch.isfinite(out).all()


def test_bad_heads_message():
    with pytest.raises(ValueError, match="divisible by heads"):
        Attention(30, heads=4)
