"""The technique contract on the points backbone: every technique that declares "points" builds (or
installs) on a tiny point transformer, trains one step, samples, changes the output against the
base model (or, for one that only records, such as heat maps, records per-point values), and keeps
the model equivariant to permuting the input points; every other technique is refused on points,
with the reason its declaration gives."""

import pytest
import torch
from control_toy import WordTokenizer
from models_util import perturbed as perturbed_train

from attnlab.conditioning import Condition
from attnlab.control.plan import check_modality, sampling_plan
from attnlab.diffusion import diffusion_loss, make_scheduler, sample
from attnlab.diffusion.schedulers import alphas_cumprod
from attnlab.errors import ConfigError
from attnlab.models import ModelConfig, build_model, training_condition
from attnlab.techniques import techniques

pytestmark = pytest.mark.usefixtures("one_thread")
ENC = WordTokenizer()
ON_POINTS = [t for t in techniques() if "points" in t.modalities]
OFF_POINTS = [t for t in techniques() if "points" not in t.modalities]
# Options under which a technique acts on the tiny model (its defaults build the base model).
ACTIVE = {
    "attn_placement": {"blocks": [0]},
    "cross_attention": {"enabled": False},
    "attn_cache": {"start": 0.0},
    "tgate": {"gate": 0.5, "drop_cfg": True},
}

# What a training-free technique that only records yields per point of the (B, 3, 48) samples, in
# place of a change to them.
RECORDS = {"heatmaps": lambda hm: hm.maps((48,))}

# With cross-attention off the text token projection stays in the model, though only the pooled
# vector is read (as in the image contract test).
UNREAD = {"cross_attention": {"cond_embed.proj.weight", "cond_embed.proj.bias"}}


def perturbed(cfg, seed=0):
    return perturbed_train(cfg, seed).eval()


def points_config(**kw) -> ModelConfig:
    base = dict(
        backbone="points",
        dims=1,
        in_channels=3,
        size=48,
        width=32,
        depth=2,
        heads=2,
        patch=8,
        cond="text",
        context_dim=ENC.dim,
    )
    return ModelConfig(**{**base, **kw})


def cond(n: int) -> Condition:
    return ENC.condition(["a cube left of a cone", "a torus", "a sphere above a cube"][:n])


def test_some_techniques_of_every_kind_declare_points():
    assert {t.name for t in ON_POINTS if t.architectural} >= {
        "linear_attention",
        "long_skips",
        "time_embedding",
    }
    assert {t.name for t in ON_POINTS if t.training_free} >= {
        "tgate",
        "attn_cache",
        "pag",
        "tome",
        "heatmaps",
    }
    assert all(t.modality_notes.get("points") for t in OFF_POINTS), [
        t.name for t in OFF_POINTS if not t.modality_notes.get("points")
    ]


@pytest.mark.parametrize("tech", [t for t in ON_POINTS if t.architectural], ids=lambda t: t.name)
def test_an_architectural_technique_trains_one_step_samples_and_changes_the_output(tech):
    cfg = points_config(techniques={tech.name: ACTIVE.get(tech.name, {})})
    torch.manual_seed(0)
    model = build_model(cfg)
    x0, c = torch.randn(3, 3, 48), cond(3)
    g = torch.Generator().manual_seed(0)
    c = training_condition(cfg, x0, c, g)
    loss = diffusion_loss(model, x0, c, alphas_cumprod(1000, "squaredcos_cap_v2"), generator=g)
    loss.backward()
    assert torch.isfinite(loss)
    bad = {n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()}
    assert bad == UNREAD.get(tech.name, set())
    out = sample(
        model.eval(),
        (2, 3, 48),
        c.index(slice(0, 2)),
        scheduler=make_scheduler("ddim"),
        steps=2,
        seeds=[0, 1],
    )
    assert out.shape == (2, 3, 48) and torch.isfinite(out).all()
    # against the base model with every shared weight copied: the technique changes the output
    ours, base = perturbed(cfg), perturbed(points_config(), seed=1)
    shared = {
        k: v
        for k, v in ours.state_dict().items()
        if k in base.state_dict() and base.state_dict()[k].shape == v.shape
    }
    base.load_state_dict(shared, strict=False)
    t = torch.tensor([50, 500, 900])
    with torch.no_grad():
        change = (ours(x0, t, c) - base(x0, t, c)).abs().max() / base(x0, t, c).abs().max()
    assert change > 1e-3


@pytest.mark.parametrize("tech", [t for t in ON_POINTS if t.architectural], ids=lambda t: t.name)
def test_an_architectural_technique_keeps_the_model_equivariant(tech):
    model = perturbed(points_config(techniques={tech.name: ACTIVE.get(tech.name, {})}))
    x, t, c = torch.randn(3, 3, 48), torch.tensor([10, 400, 800]), cond(3)
    perm = torch.randperm(48)
    with torch.no_grad():
        a, b = model(x, t, c), model(x[:, :, perm], t, c)
    assert torch.allclose(a[:, :, perm], b, atol=1e-5)


def _draw(model, plan, x_T, prompts):
    return sample(
        model,
        x_T.shape,
        ENC.condition(prompts),
        scheduler=make_scheduler("ddim"),
        steps=3,
        guidance=plan.guidance(2.0),
        seeds=[0, 1],
        x_T=x_T,
        guidances=plan.for_prompts(prompts, ENC, ()),
    )


@pytest.mark.parametrize("tech", [t for t in ON_POINTS if t.training_free], ids=lambda t: t.name)
def test_a_training_free_technique_samples_equivariantly_and_acts(tech):
    model = perturbed(points_config())
    prompts = ["a cube left of a cone", "a torus"]
    plan = sampling_plan({tech.name: ACTIVE.get(tech.name, {})}, bind_prompts=True)
    check_modality(plan.spec, model.config)
    x_T = torch.randn(2, 3, 48, generator=torch.Generator().manual_seed(5))
    perm = torch.randperm(48)
    record = RECORDS.get(tech.name)
    with torch.no_grad():
        plain = _draw(model, sampling_plan({}), x_T, prompts)
        with plan.installed(model):
            out = _draw(model, plan, x_T, prompts)
            kept = None if record is None else record(plan.controls[0])
        with plan.installed(model):
            out_perm = _draw(model, plan, x_T[:, :, perm], prompts)
            kept_perm = None if record is None else record(plan.controls[0])
    assert torch.isfinite(out).all()
    if record is None:
        assert (out - plain).abs().max() > 1e-4  # it acts
    else:  # it records per point, following the points, and changes nothing but float error
        assert kept.shape[-1] == 48 and kept.abs().max() > 0
        assert torch.allclose(kept[..., perm], kept_perm, atol=1e-5)
        x, t, c = x_T, torch.tensor([300, 900]), ENC.condition(prompts)
        with torch.no_grad():  # one denoiser call: 3 steps from t=999 amplify float error
            with plan.installed(model):
                recorded = model(x, t, c)
            assert torch.allclose(recorded, model(x, t, c), atol=1e-5)
    assert torch.allclose(out[:, :, perm], out_perm, atol=1e-4)  # and the sample follows the points
    assert not any(
        layer.controls for layer in model.modules() if hasattr(layer, "controls") and layer is not model
    )


@pytest.mark.parametrize("tech", [t for t in OFF_POINTS if t.architectural], ids=lambda t: t.name)
def test_an_architectural_technique_without_points_is_refused_with_its_reason(tech):
    with pytest.raises(ConfigError, match="points") as e:
        build_model(points_config(techniques={tech.name: {}}))
    assert tech.modality_notes["points"] in str(e.value)


@pytest.mark.parametrize("tech", [t for t in OFF_POINTS if t.training_free], ids=lambda t: t.name)
def test_a_training_free_technique_without_points_is_refused_with_its_reason(tech):
    with pytest.raises(ConfigError, match=f"technique '{tech.name}' does not take points data") as e:
        check_modality({tech.name: {}}, points_config())
    assert tech.modality_notes["points"] in str(e.value)


def test_image_models_take_every_technique_as_before():
    check_modality({t.name: {} for t in techniques()}, ModelConfig(backbone="dit", size=16, width=32))


def test_the_registry_table_names_points():
    from attnlab.techniques.table import markdown_table

    row = next(r for r in markdown_table().splitlines() if "`linear_attention`" in r)
    assert "1D/2D" in row and "points" in row


def test_the_points_backbone_names_no_technique():
    """It finds techniques only through the model plan: no registry name as a string, no `hasattr`."""
    import ast
    import inspect

    import attnlab.models.points

    tree = ast.parse(inspect.getsource(attnlab.models.points))
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not strings & {t.name for t in techniques()} and "hasattr" not in calls
