"""Every training-free technique, read from the registry: each sample equals itself drawn alone, and
every pair of techniques installed together either composes or is refused with one message."""

import itertools

import pytest
import torch
from control_toy import WordTokenizer
from models_util import tiny_config

from attnlab.attention import attention_layers
from attnlab.conditioning import Condition
from attnlab.control.plan import sampling_plan
from attnlab.diffusion import make_scheduler, sample
from attnlab.errors import ConfigError
from attnlab.models import build_model
from attnlab.techniques import techniques

pytestmark = pytest.mark.usefixtures("one_thread")

ENC = WordTokenizer()
PROMPTS = ["a red circle", "a blue square", "a green circle"]
WORDS = ("circle", "square")
STEPS = 4
# Options that make each technique act within a few steps of a tiny model.
ACTIVE = {
    "attn_cache": {"every": 2, "start": 0.0},
    "tgate": {"gate": 0.5, "warm_up": 0, "sp_interval": 2},
    "attend_excite": {"max_refine": 2},
    "tome": {"max_downsample": None},
}


# Pairs that cannot share a layer, refused when installed together: SAG reads the full map of the
# layer token merging shrinks (ACTIVE merges at every resolution).
REFUSED = [{"tome", "sag"}]


def _bindable() -> list[str]:
    """Training-free techniques the sampling plan can run from a spec (p2p needs `attnlab edit`)."""
    out = []
    for t in techniques():
        if t.training_free and not (
            t.needs_prompts and not (t.offers("bind_prompts") or t.offers("controls"))
        ):
            out.append(t.name)
    return out


def _model(backbone: str):
    cfg = tiny_config(backbone, 2, "text", context_dim=ENC.dim)
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    with torch.no_grad():  # weights away from zero-init, so every path carries signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, cfg


def _draw(model, cfg, spec: dict, rows: list[int]) -> torch.Tensor:
    plan = sampling_plan(spec, bind_prompts=True)
    prompts = [PROMPTS[r] for r in rows]
    tokens, mask = ENC.encode(prompts)
    cond = Condition(tokens=tokens.double(), mask=mask)
    seeds = [10 + r for r in rows]
    # float64 (kernels pick other reductions for other batch sizes, which float32 rounding shows),
    # each row's noise from its own seed, as `sample(seeds=...)` draws it
    noise = torch.cat(
        [torch.randn(cfg.sample_shape(1), generator=torch.Generator().manual_seed(s)) for s in seeds]
    )
    with plan.installed(model):
        return sample(
            model,
            cfg.sample_shape(len(rows)),
            cond,
            scheduler=make_scheduler("ddim"),
            steps=STEPS,
            guidance=plan.guidance(2.0),
            seeds=seeds,
            x_T=noise.double(),
            guidances=plan.for_prompts(prompts, ENC, WORDS),
        )


@pytest.mark.parametrize("backbone", ["unet", "dit"])
@pytest.mark.parametrize("name", _bindable())
def test_each_sample_equals_itself_drawn_alone(name, backbone):
    model, cfg = _model(backbone)
    spec = {name: ACTIVE.get(name, {})}
    together = _draw(model, cfg, spec, [0, 1, 2])
    for r in range(3):
        alone = _draw(model, cfg, spec, [r])
        assert torch.allclose(together[r : r + 1], alone, rtol=0, atol=1e-9 * together.abs().max()), (name, r)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
@pytest.mark.parametrize("first, second", list(itertools.combinations(_bindable(), 2)))
def test_every_pair_composes_or_is_refused(first, second, backbone):
    model, cfg = _model(backbone)
    spec = {first: ACTIVE.get(first, {}), second: ACTIVE.get(second, {})}
    try:
        out = _draw(model, cfg, spec, [0, 1])
    except ConfigError as e:  # refused: one message that names one of the two
        assert {first, second} in REFUSED, f"{first} + {second} refused: {e}"
        assert first in str(e) or second in str(e), str(e)
        return
    assert {first, second} not in REFUSED, f"{first} + {second} should be refused"
    assert out.shape == cfg.sample_shape(2) and torch.isfinite(out).all()
    assert not any(layer.controls for layer in attention_layers(model).values())  # both scopes ended
    base = _draw(model, cfg, {}, [0, 1])
    tol = 1e-6 * base.abs().max()  # well above float64 kernel rounding, far below any control's effect
    for name in (first, second):  # each still acts next to the other: dropping it changes the samples
        other = second if name == first else first
        if (_draw(model, cfg, {name: spec[name]}, [0, 1]) - base).abs().max() <= tol:
            continue  # it records (heat maps): it has no effect on samples to lose
        alone = _draw(model, cfg, {other: spec[other]}, [0, 1])
        assert (out - alone).abs().max() > tol, f"{name} has no effect next to {other}"
