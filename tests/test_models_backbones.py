"""Every backbone x modality x condition builds, keeps the data shape, and trains a step."""

import pytest
import torch
from models_util import inputs, tiny_config

from attnlab.attention import attention_layers
from attnlab.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [(b, d, c) for b in ("unet", "dit") for d in (2, 1) for c in ("none", "class", "text")]


@pytest.mark.parametrize("backbone, dims, cond", CASES)
def test_forward_shape_and_backward(backbone, dims, cond):
    cfg = tiny_config(backbone, dims, cond)
    torch.manual_seed(0)
    model = build_model(cfg)
    x, t, c = inputs(cfg)
    y = model(x, t, c)
    assert y.shape == x.shape and y.is_contiguous()
    (y - x).square().mean().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters outside the graph (breaks DDP): {unused}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("backbone, dims", [("unet", 2), ("unet", 1), ("dit", 2), ("dit", 1)])
def test_an_optimiser_step_changes_the_output(backbone, dims):
    # Zero-initialised output layers make the first output 0; one step must move it.
    cfg = tiny_config(backbone, dims, "text")
    torch.manual_seed(0)
    model = build_model(cfg)
    x, t, c = inputs(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model(x, t, c).detach()
    (model(x, t, c) - x).square().mean().backward()
    opt.step()
    assert not torch.allclose(model(x, t, c), before)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_attention_layers_get_their_token_grid(backbone):
    from attnlab.attention import Control, control

    class Grids(Control):
        def __init__(self):
            self.seen = {}

        def before(self, call, x):
            self.seen[call.name] = (call.grid, x.shape[1])
            return x

    for dims in (2, 1):
        cfg = tiny_config(backbone, dims, "text")
        model = build_model(cfg)
        rec = Grids()
        with control(model, rec):
            model(*inputs(cfg))
        assert set(rec.seen) == set(attention_layers(model))
        for grid, n in rec.seen.values():
            assert len(grid) == dims and torch.Size(grid).numel() == n


def test_scalar_timestep_is_shared_by_the_batch():
    cfg = tiny_config("dit", 2, "class")
    model = build_model(cfg)
    x, _, c = inputs(cfg)
    torch.testing.assert_close(model(x, torch.tensor(7), c), model(x, torch.full((3,), 7), c))
