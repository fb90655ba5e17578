"""The contract of every architectural technique: in each backbone and modality it declares, a tiny
model with it builds, trains one step (every parameter gets a finite gradient and moves) and draws
guided samples of the data's shape."""

import pytest
import torch
from models_util import inputs, tiny_config

from attnlab.diffusion import diffusion_loss, make_scheduler, sample
from attnlab.diffusion.schedulers import alphas_cumprod
from attnlab.models import build_model, training_condition
from attnlab.models.specs import SUPPORTED_TECHNIQUES
from attnlab.techniques import REGISTRY, techniques

pytestmark = pytest.mark.usefixtures("one_thread")


def _architectural() -> list[str]:
    techniques()  # load every provider
    return sorted(SUPPORTED_TECHNIQUES)


def _cases():
    out = []
    for name in _architectural():
        tech = REGISTRY.get(name)
        for backbone in SUPPORTED_TECHNIQUES[name]:
            for dims in tech.modalities if tech else (2,):
                out.append(pytest.param(name, backbone, dims, id=f"{name}-{backbone}-{dims}d"))
    return out


def test_registry_and_backbones_agree():
    names = set(_architectural())
    needs_training = {t.name for t in techniques() if not t.training_free}
    assert needs_training <= names, f"registered but built by no backbone: {needs_training - names}"
    assert names <= set(REGISTRY), f"built by a backbone but not registered: {names - set(REGISTRY)}"
    for name in names:
        assert set(SUPPORTED_TECHNIQUES[name]) <= set(REGISTRY[name].backbones), name


@pytest.mark.parametrize("name, backbone, dims", _cases())
def test_trains_one_step_and_samples(name, backbone, dims):
    cfg = tiny_config(backbone, dims, "text", techniques={name: {}})
    torch.manual_seed(0)
    model = build_model(cfg)
    x0, _, cond = inputs(cfg, batch=4)
    g = torch.Generator().manual_seed(0)
    cond = training_condition(cfg, x0, cond, g)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = diffusion_loss(model, x0, cond, alphas_cumprod(1000, "squaredcos_cap_v2"), generator=g)
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad}"
    opt.step()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())

    out = sample(
        model,
        x0[:2].shape,
        cond.index(slice(0, 2)),
        scheduler=make_scheduler("ddim"),
        steps=2,
        guidance=2.0,
        seeds=[0, 1],
    )
    assert out.shape == x0[:2].shape and torch.isfinite(out).all()
