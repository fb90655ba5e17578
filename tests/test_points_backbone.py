"""The points backbone: farthest-point sampling from a canonical start, kNN grouping, equivariance to
permuting the input points, training one step and sampling, and the config's refusals."""

import pytest
import torch
from models_util import perturbed as perturbed_train

from attnlab.conditioning import Condition
from attnlab.diffusion import diffusion_loss, make_scheduler, sample
from attnlab.diffusion.schedulers import alphas_cumprod
from attnlab.errors import ConfigError
from attnlab.models import ModelConfig, build_model
from attnlab.models.points import farthest_point_sample, knn

pytestmark = pytest.mark.usefixtures("one_thread")
CTX = 12


def perturbed(cfg, seed=0):
    return perturbed_train(cfg, seed).eval()


def points_config(**kw) -> ModelConfig:
    base = dict(
        backbone="points",
        dims=1,
        in_channels=3,
        size=64,
        width=32,
        depth=2,
        heads=2,
        patch=8,
        cond="text",
        context_dim=CTX,
    )
    return ModelConfig(**{**base, **kw})


def text(batch: int) -> Condition:
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(batch, 4, dtype=torch.bool)
    mask[0, 2:] = False
    return Condition(tokens=torch.randn(batch, 4, CTX, generator=g), mask=mask)


def test_farthest_point_sampling_by_hand():
    # On a line at 0, 1, 3, 10 (centroid 3.5) the farthest from the centroid is 10; then 0 (10 away),
    # then 3 (3 from 0, 7 from 10; 1 is only 1 from 0).
    p = torch.tensor([[[1.0, 0, 0], [10.0, 0, 0], [0.0, 0, 0], [3.0, 0, 0]]])
    assert farthest_point_sample(p, 3).tolist() == [[1, 2, 3]]


def test_farthest_points_do_not_depend_on_the_input_order():
    p = torch.randn(2, 50, 3)
    perm = torch.randperm(50)
    a = p.gather(1, farthest_point_sample(p, 10)[..., None].expand(-1, -1, 3))
    pp = p[:, perm]
    b = pp.gather(1, farthest_point_sample(pp, 10)[..., None].expand(-1, -1, 3))
    assert torch.equal(a, b)  # the same centres in the same order


def test_knn_against_a_brute_force_sort():
    q, p = torch.randn(1, 5, 3), torch.randn(1, 40, 3)
    d, idx = knn(q, p, 4)
    for i in range(5):
        dist = ((p[0] - q[0, i]) ** 2).sum(-1)
        assert idx[0, i].tolist() == dist.argsort()[:4].tolist()
        assert torch.allclose(d[0, i], dist.sort().values[:4], atol=1e-5)


@pytest.mark.parametrize("cond", ["none", "text"])
def test_the_backbone_is_equivariant_to_permuting_the_points(cond):
    cfg = points_config(cond=cond)
    model = perturbed(cfg)
    x, t = torch.randn(3, 3, 64), torch.tensor([5, 400, 900])
    c = text(3) if cond == "text" else None
    perm = torch.randperm(64)
    with torch.no_grad():
        out, out_perm = model(x, t, c), model(x[:, :, perm], t, c)
    assert out.abs().max() > 1e-3  # it computes something
    assert torch.allclose(out[:, :, perm], out_perm, atol=1e-5)


def test_the_output_depends_on_the_text_and_each_point_on_the_cloud():
    model = perturbed(points_config())
    x, t = torch.randn(2, 3, 64), torch.tensor([100, 100])
    with torch.no_grad():
        a = model(x, t, text(2))
        b = model(x, t, Condition(tokens=torch.randn(2, 4, CTX), mask=torch.ones(2, 4, dtype=torch.bool)))
        moved = x.clone()
        moved[:, :, 0] += 0.5  # one point moves: the others' outputs change through their groups
        c = model(moved, t, text(2))
    assert (a - b).abs().max() > 1e-3
    assert (a[:, :, 1:] - c[:, :, 1:]).abs().max() > 1e-4


def test_starts_at_zero_and_trains_one_step_then_samples():
    cfg = points_config()
    model = build_model(cfg)
    x0, cond = torch.randn(4, 3, 64), text(4)
    with torch.no_grad():
        assert model(x0, torch.tensor([1, 2, 3, 4]), cond).abs().max() == 0  # adaLN-Zero, zero output
    g = torch.Generator().manual_seed(0)
    loss = diffusion_loss(model, x0, cond, alphas_cumprod(1000, "squaredcos_cap_v2"), generator=g)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    out = sample(
        model, (2, 3, 64), cond.index(slice(0, 2)), scheduler=make_scheduler("ddim"), steps=2, seeds=[0, 1]
    )
    assert out.shape == (2, 3, 64) and torch.isfinite(out).all()


def test_layers_are_named_and_tokens_are_the_groups():
    from attnlab.attention.bus import attention_grids

    model = build_model(points_config(groups=12))
    assert attention_grids(model) == {f"blocks.{i}.{k}": (12,) for i in range(2) for k in ("self", "cross")}
    assert points_config(patch=8).point_groups() == 16  # 2 * size // patch


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"in_channels": 1}, "model.in_channels"),
        ({"dims": 2}, "model.dims"),
        ({"patch": 65}, "model.patch"),
        ({"groups": 65}, "model.groups"),
    ],
)
def test_bad_points_configs_are_refused(kw, key):
    with pytest.raises(ConfigError, match=key):
        points_config(**kw)


def test_groups_stay_out_of_other_backbones_configs():
    from attnlab.models.config import preset

    assert "groups" not in preset("dit-tiny").to_dict()
    assert points_config(groups=10).to_dict()["groups"] == 10


def test_a_grid_backbone_is_refused_on_point_clouds():
    from attnlab.config import load_config

    with pytest.raises(ConfigError, match="model.backbone.*points for the points dataset"):
        load_config(None, ["data.name=points", "data.size=128", "model.backbone=dit", "model.patch=4"])
