"""The technique contract: every registered technique declares what it is and what it provides, and
does it. An architectural one, in each backbone and modality it declares, builds a tiny model that
trains one step (every parameter gets a finite gradient, and what has a non-zero one moves) and
draws guided samples of the data's shape; elsewhere it is refused from its declaration. With the
same weights as the base model (the same backbone config without it) it changes the output, and on
perturbed weights every parameter reaches the loss. A training-free one builds from its declaration
into the sampling plan, samples on every backbone and modality it declares, and leaves no control
behind."""

import dataclasses
import re

import pytest
import torch
from control_toy import WordTokenizer
from models_util import inputs, perturbed, tiny_config

from attnlab.attention import attention_layers
from attnlab.attention.bus import Control
from attnlab.control.plan import sampling_plan
from attnlab.diffusion import diffusion_loss, make_scheduler, sample
from attnlab.diffusion.schedulers import alphas_cumprod
from attnlab.errors import ConfigError
from attnlab.models import build_model, training_condition
from attnlab.techniques import LEVELS, registry, techniques
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
                if isinstance(dims, str):  # a named modality (tokens, points): its own contract test
                    continue
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
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)  # only gradients move weights
    loss = diffusion_loss(model, x0, cond, alphas_cumprod(1000, "squaredcos_cap_v2"), generator=g)
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad}"
    opt.step()
    # At initialisation the zero output layer zeroes every gradient behind it (the perturbed model of
    # test_every_parameter_reaches_the_loss has them all): what has a non-zero gradient moves.
    with_grad = {n for n, p in model.named_parameters() if p.grad.any()}
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert with_grad and moved == with_grad

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


# The technique changes the model: against the base model with the same weights


# Options that make an architectural technique act on the tiny models, where its defaults build the
# base model (every block keeps self- and cross-attention; 4-token windows cover the DiT's 4 x 4 grid).
ARCH_ACTIVE = {
    ("attn_placement", "unet"): {"up": False},
    ("attn_placement", "dit"): {"blocks": [0]},
    ("cross_attention", "unet"): {"enabled": False},
    ("cross_attention", "dit"): {"enabled": False},
    ("window_attention", "unet"): {"window": 2},
    ("window_attention", "dit"): {"window": 2},
}
# Base parameters a technique drops or reshapes, so the two models cannot share them: the sub-layers
# it removes, the adaLN regressions whose width follows the sub-layers, U-Net embeddings it replaces.
REPLACED = {
    "attn_placement": r"\.(self|norms\.1|ada)\.",
    "cross_attention": r"\.(cross|norms\.1|ada)\.",
    "in_context": r"^blocks\.\d+\.(cross|ada)\.",
    "channel_attention": r"^blocks\.\d+\.ada\.",
    "time_embedding": r"\.(emb|ada)\.",
}
# Parameters no computation reads. With cross-attention off the text token projection stays in the
# model (and its state dict) though only the pooled vector is used.
UNREAD = {("cross_attention", False): {"cond_embed.proj.weight", "cond_embed.proj.bias"}}
CHANGE_TOL = 1e-4  # relative to the base output's scale; a change the technique makes is >= ~1e-2


def active_options(name: str, backbone: str) -> dict:
    return ARCH_ACTIVE.get((name, backbone), {})


def against_base(name: str, backbone: str, dims: int, options: dict | None = None):
    """(relative output change, base parameters not shared) of the technique model against the base.

    Both models get seeded noise on every weight (`perturbed`): the backbones' zero-initialised
    residual branches and output layer would make both outputs zero, and a technique's own parameters
    that start as the identity (mask_cond's zero input layer, the time gate's zero regression, the
    cross-scale layer's zero output, a learned position table at the sin-cos values) would make it
    compute the base model. Every base parameter the technique model has under the same name and shape
    is then copied from it, so the two differ only by the technique. Both run in eval mode (token
    merging draws fixed destinations) on the same x, t and condition, with the technique's training
    additions (mask_cond's inpainting input, which the base ignores).
    """
    options = active_options(name, backbone) if options is None else options
    cfg = tiny_config(backbone, dims, "text", techniques={name: options})
    model = perturbed(cfg, seed=0).eval()
    base = perturbed(tiny_config(backbone, dims, "text"), seed=1).eval()
    ours, theirs = model.state_dict(), base.state_dict()
    shared = {k: v for k, v in ours.items() if k in theirs and theirs[k].shape == v.shape}
    result = base.load_state_dict(shared, strict=False)
    assert not result.unexpected_keys
    x, t, cond = inputs(cfg)
    cond = training_condition(cfg, x, cond, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, ref = model(x, t, cond), base(x, t, cond)
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    change = ((out - ref).abs().max() / ref.abs().max()).item()
    not_shared = {k for k, _ in base.named_parameters() if k not in shared}
    return change, not_shared


def parameters_without_gradient(cfg) -> set[str]:
    """Parameters of the perturbed model that one training loss gives no finite, non-zero gradient;
    an AdamW step without weight decay then moves every other one."""
    model = perturbed(cfg, seed=0)
    x0, _, cond = inputs(cfg, batch=4)
    g = torch.Generator().manual_seed(0)
    cond = training_condition(cfg, x0, cond, g)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    diffusion_loss(model, x0, cond, alphas_cumprod(1000, "squaredcos_cap_v2"), generator=g).backward()
    missing = {
        n
        for n, p in model.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()
    }
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(before) - missing
    return missing


@pytest.mark.parametrize("name, backbone, dims", _cases(architectural=True))
def test_changes_the_output_against_the_base_model(name, backbone, dims):
    change, not_shared = against_base(name, backbone, dims)
    assert change > CHANGE_TOL, f"{name} computes the base model (relative change {change:.2g})"
    pattern = REPLACED.get(name)
    unmatched = {k for k in not_shared if pattern is None or not re.search(pattern, k)}
    assert not unmatched, f"base parameters the {name} model lacks: {sorted(unmatched)}"


@pytest.mark.parametrize("name, backbone, dims", _cases(architectural=True))
def test_every_parameter_reaches_the_loss(name, backbone, dims):
    options = active_options(name, backbone)
    cfg = tiny_config(backbone, dims, "text", techniques={name: options})
    assert parameters_without_gradient(cfg) == UNREAD.get((name, options.get("enabled")), set())


@pytest.fixture
def throwaway(monkeypatch):
    """`register` for techniques that leave the registry with the test."""
    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    return lambda name, **kw: register(name, level=2, paper="-", training_free=False, summary="-", **kw)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_the_comparison_flags_a_technique_that_changes_nothing(backbone, throwaway):
    """A technique whose hook leaves every block as it is builds the base model: no change, and
    every base parameter shared."""

    @throwaway("inert", provides=("edit_spec",))
    @dataclasses.dataclass
    class Inert:
        def edit_spec(self, spec, where):
            return spec

    assert against_base("inert", backbone, 2, {}) == (0.0, set())


def test_the_comparison_flags_a_technique_whose_module_ignores_its_parameters(throwaway):
    """A skip gate that passes the skip through, whatever its parameter holds, is caught twice: the
    output is the base model's, and its parameter gets no gradient."""

    class IgnoredGate(torch.nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(channels))

        def forward(self, skip, g):
            return skip

    @throwaway("ignored_gate", provides=("skip_gate",), hosts=("unet",))
    @dataclasses.dataclass
    class IgnoredGateTechnique:
        def skip_gate(self, cfg, size, skip_channels, gate_channels):
            return IgnoredGate(skip_channels)

    change, not_shared = against_base("ignored_gate", "unet", 2, {})
    assert change < CHANGE_TOL and not not_shared
    unread = parameters_without_gradient(tiny_config("unet", 2, "text", techniques={"ignored_gate": {}}))
    assert unread and all(n.endswith(".skip_gate.weight") for n in unread)


def _same(self, spec, where):
    return spec


def _none(self, *args):
    return None


# A real technique with the hook that does its work stubbed to give the base model's answer.
STUBS = [
    pytest.param(name, backbone, hook, stub, id=f"{name}-{backbone}-{hook}")
    for name, backbone, hook, stub in [
        ("window_attention", "unet", "edit_spec", _same),
        ("window_attention", "dit", "edit_spec", _same),
        ("time_gated_attention", "dit", "edit_spec", _same),
        ("attention_gate", "unet", "skip_gate", _none),
        ("mask_cond", "unet", "input_layer", _none),
        ("long_skips", "dit", "run_blocks", _none),
    ]
]


@pytest.mark.parametrize("name, backbone, hook, stub", STUBS)
def test_the_comparison_flags_a_technique_whose_hook_is_ignored(name, backbone, hook, stub, monkeypatch):
    assert against_base(name, backbone, 2)[0] > CHANGE_TOL
    monkeypatch.setattr(registry.get(name).options, hook, stub)
    assert against_base(name, backbone, 2) == (0.0, set())


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
