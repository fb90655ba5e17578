"""The technique contract: every registered technique declares what it is and what it provides, and
does it. An architectural one, in each backbone and modality it declares, builds a tiny model that
trains one step (every parameter gets a finite gradient and moves) and draws guided samples of the
data's shape; elsewhere it is refused from its declaration. A training-free one builds from its
declaration into the sampling plan, samples on every backbone and modality it declares, and leaves
no control behind."""

import dataclasses

import pytest
import torch
from control_toy import WordTokenizer
from models_util import inputs, tiny_config

from attnlab.attention import attention_layers
from attnlab.attention.bus import Control
from attnlab.control.plan import sampling_plan
from attnlab.diffusion import diffusion_loss, make_scheduler, sample
from attnlab.diffusion.schedulers import alphas_cumprod
from attnlab.errors import ConfigError
from attnlab.models import build_model, training_condition
from attnlab.techniques import LEVELS, techniques
from attnlab.techniques.registry import HOOKS, SAMPLING_HOOKS, register

pytestmark = pytest.mark.usefixtures("one_thread")

ENC = WordTokenizer()


def _cases(architectural: bool):
    out = []
    for tech in techniques():
        if (tech.architectural if architectural else tech.training_free) is False:
            continue
        for backbone in tech.hosts:
            for dims in tech.modalities:
                out.append(pytest.param(tech.name, backbone, dims, id=f"{tech.name}-{backbone}-{dims}d"))
    return out


@pytest.mark.parametrize("tech", techniques(), ids=lambda t: t.name)
def test_every_declaration_is_complete(tech):
    assert tech.level in LEVELS and tech.paper and tech.summary
    assert tech.provides and tech.provides <= HOOKS.keys()
    assert dataclasses.is_dataclass(tech.options)
    assert set(tech.defaults) == {f.name for f in dataclasses.fields(tech.options) if f.init}
    if tech.training_free:  # it acts at sampling time through one of the sampling hook points
        assert tech.provides & {"controls", "guidance"}
    else:
        assert tech.architectural and not tech.provides & SAMPLING_HOOKS.keys()
    if tech.offers("controls"):
        assert issubclass(tech.options, Control)
    if tech.needs_text or tech.offers("bind_prompts"):
        assert tech.needs_prompts  # where to use it outside the plain sampling plan


def test_a_declaration_is_checked_when_registered():
    with pytest.raises(ValueError, match="unknown hook point"):
        register("bad_hook", level=2, paper="-", training_free=False, summary="-", provides=("wings",))
    with pytest.raises(ValueError, match=r"without their method\(s\): \['skip_gate'\]"):

        @register("no_method", level=4, paper="-", training_free=False, summary="-", provides=("skip_gate",))
        @dataclasses.dataclass
        class NoMethod:
            pass

    with pytest.raises(ValueError, match="hosts must be among"):
        register(
            "bad_host",
            level=2,
            paper="-",
            training_free=False,
            summary="-",
            provides=("check",),
            hosts=("x",),
        )
    assert "no_method" not in {t.name for t in techniques()}


@pytest.mark.parametrize("tech", [t for t in techniques() if t.architectural], ids=lambda t: t.name)
def test_an_architectural_technique_is_refused_outside_its_declared_backbones(tech):
    for backbone in {"unet", "dit"} - set(tech.hosts):
        with pytest.raises(ConfigError, match=f"not an architectural technique of the {backbone} backbone"):
            build_model(tiny_config(backbone, 2, "text", techniques={tech.name: {}}))


def test_a_training_free_only_technique_is_refused_as_architecture():
    with pytest.raises(ConfigError, match="model.techniques.pag is not an architectural technique"):
        build_model(tiny_config("unet", 2, "text", techniques={"pag": {}}))


def test_an_architectural_technique_is_refused_at_sampling_time():
    with pytest.raises(ConfigError, match="changes the architecture; set it in model.techniques"):
        sampling_plan({"attention_gate": {}})


def test_the_backbones_and_the_hosts_name_no_technique():
    """The U-Net, the DiT, the model and sampling plans and the PoC's sampler find techniques only by
    what they declare: no registry name as a string, no `hasattr` probing."""
    import ast
    import inspect

    import attnlab.control.plan
    import attnlab.models.dit
    import attnlab.models.plan
    import attnlab.models.unet
    import attnlab.poc.sampling

    names = {t.name for t in techniques()}
    hosts = (
        attnlab.models.unet,
        attnlab.models.dit,
        attnlab.models.plan,
        attnlab.control.plan,
        attnlab.poc.sampling,
    )
    for module in hosts:
        tree = ast.parse(inspect.getsource(module))
        strings = {
            n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
        }
        calls = {
            n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        }
        assert not strings & names, (module.__name__, strings & names)
        assert "hasattr" not in calls, module.__name__


@pytest.mark.parametrize("name, backbone, dims", _cases(architectural=True))
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


# Options that make a training-free technique act within two sampling steps on a tiny model.
ACTIVE = {"attn_cache": {"start": 0.0}, "tgate": {"gate": 0.5, "drop_cfg": True}, "heatmaps": {}}


@pytest.mark.parametrize("name, backbone, dims", _cases(architectural=False))
def test_a_training_free_technique_samples_from_its_declaration(name, backbone, dims):
    tech = next(t for t in techniques() if t.name == name)
    cfg = tiny_config(backbone, dims, "text", context_dim=ENC.dim)  # every control has a layer to act on
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    prompts = ["a red circle", "a blue square"]
    cond = ENC.condition(prompts)
    if tech.needs_prompts and not (tech.offers("bind_prompts") or tech.offers("controls")):
        with pytest.raises(ConfigError, match=f"needs its prompts bound; use {tech.needs_prompts}"):
            sampling_plan({name: {}}, bind_prompts=True)
        return
    plan = sampling_plan({name: ACTIVE.get(name, {})}, bind_prompts=True)
    shape = cfg.sample_shape(2)
    with plan.installed(model):
        out = sample(
            model,
            shape,
            cond,
            scheduler=make_scheduler("ddim"),
            steps=2,
            guidance=plan.guidance(2.0),
            seeds=[0, 1],
            guidances=plan.for_prompts(prompts, ENC, ("circle", "square")),
        )
    assert out.shape == shape and torch.isfinite(out).all()
    assert not any(layer.controls for layer in attention_layers(model).values())  # the scope cleaned up


def test_every_module_that_registers_a_technique_is_a_provider():
    """A technique file left out of PROVIDERS would be missing from the registry whenever nothing
    else happened to import it."""
    from pathlib import Path

    from attnlab.techniques.registry import PROVIDERS

    root = Path(__file__).resolve().parents[1] / "attnlab"
    registering = {
        ".".join(p.relative_to(root.parent).with_suffix("").parts)
        for p in root.rglob("*.py")
        if "\n@register(" in p.read_text()
    }
    assert registering == set(PROVIDERS)
    assert len({t.options.__module__ for t in techniques()}) == len(techniques())  # one technique a file
