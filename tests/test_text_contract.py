"""The technique contract on tokens: every technique that declares the "tokens" modality builds a
tiny token model that trains one MDLM step (every parameter gets a finite gradient, what has a
non-zero one moves), changes the output against the base model with the same weights, and samples
with both samplers; a training-free one samples from its declaration and leaves no control behind.
Every other technique is refused on tokens with the reason it declares."""

import pytest
import torch
from tokens_util import tiny_tokens

from attnlab.attention import attention_layers
from attnlab.conditioning import Condition
from attnlab.control.plan import sampling_plan
from attnlab.diffusion.masked import mdlm_loss, sample_tokens
from attnlab.errors import ConfigError
from attnlab.techniques import techniques
from attnlab.train.text import check_token_techniques

MASK, V, L = 1, 12, 8
TOKENS = [t for t in techniques() if "tokens" in t.modalities]
ARCH = [t.name for t in TOKENS if t.architectural]
FREE = [t.name for t in TOKENS if t.training_free]
REFUSED = [t for t in techniques() if "tokens" not in t.modalities]
# Options that make a technique act on the tiny model where its defaults build the base model.
ACTIVE = {
    "attn_placement": {"blocks": [0]},
    "cross_attention": {"blocks": [1]},
    "window_attention": {"window": 4},
    "attn_cache": {"start": 0.0},
    "tgate": {"gate": 0.5, "drop_cfg": True},
}
# Base parameters a technique drops or reshapes (as in tests/test_techniques_contract.py).
REPLACED = {
    "attn_placement": r"\.(self|norms\.1|ada)\.",
    "cross_attention": r"\.(cross|norms\.1|ada)\.",
    "in_context": r"^blocks\.\d+\.(cross|ada)\.",
    "channel_attention": r"^blocks\.\d+\.ada\.",
    "time_embedding": r"(\.(emb|ada)\.|^final\.ada\.|^time_embed\.)",
}


def tiny(techniques=None, cond="text", seed=0, noise=0.0):
    return tiny_tokens(V, L, cond=cond, techniques=techniques, seed=seed, noise=noise)


def batch(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(4, V, (b, L), generator=g)
    ids = torch.randint(1, 6, (b, 3), generator=g)
    mask = torch.ones(b, 3, dtype=torch.bool)
    mask[0, 2:] = False
    return x0, Condition(tokens=ids, mask=mask)


def test_the_tokens_modality_is_declared_by_the_designs_the_issue_names():
    assert {"rope", "abs_pos", "time_embedding", "in_context", "cross_attention"} <= set(ARCH)
    assert {"linear_attention", "window_attention", "long_skips"} <= set(ARCH)
    assert {"pag", "attn_cache", "tgate"} <= set(FREE)


@pytest.mark.parametrize("name", ARCH)
def test_trains_one_step_and_samples_on_tokens(name):
    model = tiny({name: ACTIVE.get(name, {})})
    x0, cond = batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    loss = mdlm_loss(model, x0, cond, mask_id=MASK, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f"parameters without a finite gradient: {bad}"
    opt.step()
    with_grad = {n for n, p in model.named_parameters() if p.grad.any()}
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert with_grad and moved == with_grad
    for sampler in ("ancestral", "confidence"):
        out = sample_tokens(
            model,
            (2, L),
            cond.index(slice(0, 2)),
            mask_id=MASK,
            steps=3,
            sampler=sampler,
            guidance=2.0,
            seeds=[0, 1],
        )
        assert out.shape == (2, L) and (out != MASK).all()


@pytest.mark.parametrize("name", ARCH)
def test_every_parameter_reaches_the_loss_on_tokens(name):
    model = tiny({name: ACTIVE.get(name, {})}, noise=0.05)
    x0, cond = batch()
    mdlm_loss(model, x0, cond, mask_id=MASK, generator=torch.Generator().manual_seed(0)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"parameters the loss does not reach: {missing}"


@pytest.mark.parametrize("name", ARCH)
def test_changes_the_output_against_the_base_token_model(name):
    import re

    model = tiny({name: ACTIVE.get(name, {})}, noise=0.05).eval()
    base = tiny(seed=1, noise=0.05).eval()
    ours, theirs = model.state_dict(), base.state_dict()
    shared = {k: v for k, v in ours.items() if k in theirs and theirs[k].shape == v.shape}
    assert not base.load_state_dict(shared, strict=False).unexpected_keys
    x0, cond = batch(3)
    z = torch.where(torch.rand(x0.shape, generator=torch.Generator().manual_seed(2)) < 0.5, MASK, x0)
    t = torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        out, ref = model(z, t, cond), base(z, t, cond)
    assert ((out - ref).abs().max() / ref.abs().max()).item() > 1e-4, f"{name} computes the base model"
    not_shared = {k for k, _ in base.named_parameters() if k not in shared}
    pattern = REPLACED.get(name)
    assert all(pattern and re.search(pattern, k) for k in not_shared), sorted(not_shared)


@pytest.mark.parametrize("name", FREE)
@pytest.mark.parametrize("sampler", ["ancestral", "confidence"])
def test_a_training_free_technique_samples_tokens_from_its_declaration(name, sampler):
    model = tiny(noise=0.05).eval()
    _, cond = batch(2)
    spec = {name: ACTIVE.get(name, {})}
    check_token_techniques(spec)
    plan = sampling_plan(spec)
    with plan.installed(model):
        out = sample_tokens(
            model,
            (2, L),
            cond,
            mask_id=MASK,
            steps=4,
            sampler=sampler,
            guidance=plan.guidance(2.0),
            guidances=plan.guidances,
            seeds=[0, 1],
        )
    assert out.shape == (2, L) and (out != MASK).all()
    assert not any(layer.controls for layer in attention_layers(model).values())


def test_a_training_free_technique_changes_token_samples():
    """PAG's perturbed pass enters the logits: with a large scale the draws change."""
    model = tiny(noise=0.3).eval()
    _, cond = batch(4)
    plain = sample_tokens(model, (4, L), cond, mask_id=MASK, steps=4, seeds=[0, 1, 2, 3])
    plan = sampling_plan({"pag": {"scale": 20.0}})
    with plan.installed(model):
        pag = sample_tokens(
            model, (4, L), cond, mask_id=MASK, steps=4, guidances=plan.guidances, seeds=[0, 1, 2, 3]
        )
    assert not torch.equal(plain, pag)


@pytest.mark.parametrize("tech", REFUSED, ids=lambda t: t.name)
def test_a_technique_without_tokens_is_refused_with_its_reason(tech):
    assert tech.modality_notes.get("tokens"), f"{tech.name} does not say why it does not take tokens"
    if tech.architectural:
        with pytest.raises(ConfigError, match="not an architectural technique of the tokens backbone") as e:
            tiny({tech.name: {}})
    else:
        with pytest.raises(ConfigError, match="not tokens") as e:
            check_token_techniques({tech.name: {}})
    assert tech.modality_notes["tokens"] in str(e.value)


def test_a_time_gate_without_a_time_input_is_refused():
    with pytest.raises(ConfigError, match="time_gated_attention gates by the timestep"):
        tiny({"time_gated_attention": {}, "time_embedding": {"mode": "none"}})
