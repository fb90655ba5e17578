"""SAG and PAG against their references, step by step.

Each reference loop below is written here from diffusers' pipelines (SAG:
`pipelines/deprecated/stable_diffusion_sag/pipeline_stable_diffusion_sag.py`; PAG:
`pipelines/pag/pag_utils.py`, `pipeline_pag_sd.py`) and the papers, on a diffusers scheduler and
the bare model (no attnlab control installed): the attention map, the identity-map pass, the blur,
the re-noising and the guidance formulas are all computed in this file. attnlab's `sample` with
the control must reproduce it to 1e-5 of the output's scale, and the control's own effect must be
at least 100 times that, so a control that does nothing cannot pass. The models run in float64:
the first trailing DDIM step divides by sqrt(alpha_bar_999) ~ 0.006, which in float32 turns kernel
rounding (the math path against SDPA, a batch of 3 against 1) into 1e-4 of the output.
"""

import pytest
import torch
import torch.nn.functional as F
from models_util import perturbed, tiny_config

import attnlab.attention.core as core
from attnlab.attention import attention_layers
from attnlab.conditioning import Condition
from attnlab.control import PAG, SAG
from attnlab.diffusion import make_scheduler, sample

STEPS = 4
REL_TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")
# The reference's layer on each tiny backbone: the U-Net's mid-block self-attention; on a DiT of
# depth 2, SAG's middle block (depth // 2) and PAG's "blocks.1" are the same block.
REF_LAYER = {"unet": "mid.attn.self", "dit": "blocks.1.self"}


def _model(backbone: str):
    cfg = tiny_config(backbone, 2, "class")
    model = perturbed(cfg, seed=0).eval().double()
    x_T = torch.randn(cfg.sample_shape(2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return model, x_T, Condition(labels=torch.tensor([0, 2]))


def _attnlab(model, x_T, cond, w, prediction="epsilon", guidances=()):
    sched = make_scheduler("ddim", prediction_type=prediction)
    return sample(
        model, x_T.shape, cond, scheduler=sched, steps=STEPS, guidance=w, x_T=x_T, guidances=guidances
    )


def _check(out, ref, plain):
    """out equals ref to REL_TOL of the output's scale; the control moved the sample 100x further."""
    tol = REL_TOL * ref.abs().max()
    assert (out - ref).abs().max() <= tol, float((out - ref).abs().max() / ref.abs().max())
    assert (ref - plain).abs().max() >= 100 * tol
    return tol


# The reference's pieces, written from diffusers' code


def _probs(layer, x):
    """softmax(q k^T / sqrt(d)) of a self-attention layer on its input tokens x (B, N, C): (B, heads, N, N)."""
    b, n, c = x.shape
    q, k, _ = F.linear(x, layer.to_qkv.weight, layer.to_qkv.bias).chunk(3, dim=-1)
    q, k = (z.view(b, n, layer.heads, c // layer.heads).transpose(1, 2) for z in (q, k))
    return (q @ k.transpose(-1, -2) / (c // layer.heads) ** 0.5).softmax(-1)


def _identity_output(layer, args, output):
    """A forward hook giving PAG's perturbed self-attention: the identity map, so to_out(to_v(x))."""
    c = layer.dim
    bias = None if layer.to_qkv.bias is None else layer.to_qkv.bias[2 * c :]
    return layer.to_out(F.linear(args[0], layer.to_qkv.weight[2 * c :], bias))


def _blur_2d(img, kernel_size=9, sigma=1.0):
    """diffusers' `gaussian_blur_2d`: one 2D product kernel, reflect padding."""
    half = (kernel_size - 1) * 0.5
    pdf = torch.exp(-0.5 * (torch.linspace(-half, half, steps=kernel_size) / sigma) ** 2)
    k1 = pdf / pdf.sum()
    k2 = torch.outer(k1, k1).to(img).expand(img.shape[1], 1, kernel_size, kernel_size)
    return F.conv2d(F.pad(img, [kernel_size // 2] * 4, mode="reflect"), k2, groups=img.shape[1])


def _pred_x0_eps(prediction, x, out, ab):
    """diffusers' SAG `pred_x0` and `pred_epsilon` (the DDIM algebra) for eps and v models."""
    if prediction == "epsilon":
        return (x - (1 - ab) ** 0.5 * out) / ab**0.5, out
    return ab**0.5 * x - (1 - ab) ** 0.5 * out, (1 - ab) ** 0.5 * x + ab**0.5 * out


def _main_pass(model, x, t, cond, w):
    """eps_uncond (None without CFG), eps_cond, and the CFG-combined prediction."""
    tb = t.expand(x.shape[0])
    if w == 1.0:
        eps_c = model(x, tb, cond)
        return None, eps_c, eps_c
    eps_u, eps_c = model(torch.cat([x, x]), tb.repeat(2), Condition.cat([cond.null_like(), cond])).chunk(2)
    return eps_u, eps_c, eps_u + w * (eps_c - eps_u)


@torch.no_grad()
def _sag_reference(model, x_T, cond, w, scale, prediction, layer_name, branch="uncond"):
    """diffusers' SAG loop; returns the sample and the smallest |attention mass - 1| it thresholded."""
    sched = make_scheduler("ddim", prediction_type=prediction)
    sched.set_timesteps(STEPS)
    layer, seen, margin = attention_layers(model)[layer_name], [], float("inf")
    hook = layer.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x = x_T.clone()
    try:
        for t in sched.timesteps:
            seen.clear()
            eps_u, eps_c, noise_pred = _main_pass(model, x, t, cond, w)
            attn = _probs(layer, seen[0])  # the main pass's map, (rows, heads, N, N)
            on_uncond = eps_u is not None and branch == "uncond"  # Eq. 25: the uncond branch under CFG
            if eps_u is not None:
                attn = attn.chunk(2)[0 if on_uncond else 1]
            pred, pass_cond = (eps_u, cond.null_like()) if on_uncond else (eps_c, cond)
            x0, eps = _pred_x0_eps(prediction, x, pred, sched.alphas_cumprod[t])
            mass = attn.mean(1).sum(1)  # (B, N): the attention each key receives
            margin = min(margin, float((mass - 1).abs().min()))
            side = int(mass.shape[1] ** 0.5)
            mask = (mass > 1.0).view(-1, 1, side, side).repeat(1, x.shape[1], 1, 1).float()
            mask = F.interpolate(mask, x.shape[-2:])
            degraded = _blur_2d(x0) * mask + x0 * (1 - mask)
            degraded = sched.add_noise(degraded, eps, t[None])
            noise_pred = noise_pred + scale * (pred - model(degraded, t.expand(x.shape[0]), pass_cond))
            x = sched.step(noise_pred, t, x).prev_sample
    finally:
        hook.remove()
    return x, margin


@torch.no_grad()
def _pag_reference(model, x_T, cond, w, scale, adaptive, layer_names):
    """diffusers' PAG loop: a perturbed pass with identity maps, then `_apply_perturbed_attention_guidance`."""
    sched = make_scheduler("ddim")
    sched.set_timesteps(STEPS)
    layers = [attention_layers(model)[n] for n in layer_names]
    x = x_T.clone()
    for t in sched.timesteps:
        eps_u, eps_c, noise_pred = _main_pass(model, x, t, cond, w)
        hooks = [layer.register_forward_hook(_identity_output) for layer in layers]
        try:
            eps_ptb = model(x, t.expand(x.shape[0]), cond)
        finally:
            for h in hooks:
                h.remove()
        s = max(0.0, scale - adaptive * (1000 - int(t)))  # `_get_pag_scale`
        if eps_u is None:
            noise_pred = eps_c + s * (eps_c - eps_ptb)
        else:
            noise_pred = eps_u + w * (eps_c - eps_u) + s * (eps_c - eps_ptb)
        x = sched.step(noise_pred, t, x).prev_sample
    return x


# SAG


@pytest.mark.parametrize(
    "backbone, w, prediction",
    [
        ("unet", 3.0, "epsilon"),
        ("unet", 1.0, "epsilon"),
        ("unet", 3.0, "v_prediction"),
        ("dit", 3.0, "epsilon"),
    ],
)
def test_sag_follows_the_reference_step_by_step(backbone, w, prediction):
    model, x_T, cond = _model(backbone)
    ref, margin = _sag_reference(model, x_T, cond, w, 0.75, prediction, REF_LAYER[backbone])
    assert margin > 1e-5  # no mass sits so close to the threshold that float error could flip the mask
    plain = _attnlab(model, x_T, cond, w, prediction)
    out = _attnlab(model, x_T, cond, w, prediction, [SAG()])  # the defaults: scale 0.75, one map
    tol = _check(out, ref, plain)
    if w != 1.0:  # attnlab's former defaults (every layer's mask, cond branch, 7 taps) fail this test
        old = _attnlab(model, x_T, cond, w, prediction, [SAG(layers="**", branch="cond", blur_taps=7)])
        assert (old - ref).abs().max() > 100 * tol


def test_sag_cond_branch_variant_follows_its_own_loop():
    model, x_T, cond = _model("unet")
    ref, _ = _sag_reference(model, x_T, cond, 3.0, 1.5, "epsilon", REF_LAYER["unet"], branch="cond")
    plain = _attnlab(model, x_T, cond, 3.0)
    _check(_attnlab(model, x_T, cond, 3.0, guidances=[SAG(scale=1.5, branch="cond")]), ref, plain)


def test_sag_reads_one_map_on_the_math_path_and_adds_one_pass_per_step(monkeypatch):
    """Its real cost: the reference layer alone runs the explicit softmax (for the whole CFG batch,
    since every probability hook sees every row), only on the main pass; one extra forward per step."""
    model, x_T, cond = _model("unet")
    explicit, forwards, probs = [], [], core.Attention._probs

    def logged(layer, q, *a):
        explicit.append((layer.name, model.bus_state.roles, q.shape[0]))
        return probs(layer, q, *a)

    monkeypatch.setattr(core.Attention, "_probs", logged)
    model.register_forward_hook(
        lambda m, args, out: forwards.append((model.bus_state.step, args[0].shape[0]))
    )
    _attnlab(model, x_T, cond, 3.0, guidances=[SAG()])
    assert explicit == [("mid.attn.self", ("uncond", "cond"), 4)] * STEPS
    steps = [f for f in forwards if f[0] is not None]  # the loop's calls (not a probe outside the steps)
    assert steps == [(i, n) for i in range(STEPS) for n in (4, 2)]  # the CFG batch, then the degraded pass


def test_sag_default_map_per_backbone():
    dit = perturbed(tiny_config("dit", 2, "class", depth=12))
    assert [m.name for m in SAG().controls()[0].select(dit)] == ["blocks.6.self"]
    unet = _model("unet")[0]
    assert [m.name for m in SAG().controls()[0].select(unet)] == ["mid.attn.self"]
    assert len(SAG(layers="**").controls()[0].select(unet)) == 4  # the union variant reads every map


# PAG


@pytest.mark.parametrize(
    "backbone, w, adaptive",
    [("unet", 3.0, 0.0), ("unet", 1.0, 0.0), ("unet", 3.0, 0.005), ("unet", 1.0, 0.005), ("dit", 3.0, 0.005)],
)
def test_pag_follows_the_reference_step_by_step(backbone, w, adaptive):
    model, x_T, cond = _model(backbone)
    ref = _pag_reference(model, x_T, cond, w, 3.0, adaptive, [REF_LAYER[backbone]])
    plain = _attnlab(model, x_T, cond, w)
    out = _attnlab(model, x_T, cond, w, guidances=[PAG(adaptive_scale=adaptive)])  # scale 3.0, default layers
    tol = _check(out, ref, plain)
    if backbone == "unet":  # attnlab's former default (every self-attention) fails this test
        old = _attnlab(model, x_T, cond, w, guidances=[PAG(layers="**", adaptive_scale=adaptive)])
        assert (old - ref).abs().max() > 100 * tol


def test_pag_adaptive_scale_skips_the_pass_where_it_reaches_zero():
    """Trailing DDIM over 4 steps visits t = 999, 749, 499, 249: s = 3 - 0.005 (1000 - t) is 0 at t = 249."""
    model, x_T, cond = _model("unet")
    pag, forwards = PAG(adaptive_scale=0.005), []
    torch.testing.assert_close(
        pag.scale_at(torch.tensor([999, 249])), torch.tensor([2.995, 0.0], dtype=torch.float64)
    )
    model.register_forward_hook(lambda m, args, out: forwards.append(model.bus_state.roles))
    _attnlab(model, x_T, cond, 3.0, guidances=[pag])
    assert forwards.count(("pag",)) == 3 and forwards.count(("uncond", "cond")) == 4


def test_pag_layer_names_match_whole_parts():
    """diffusers' "blocks.1" also perturbs blocks.10 and blocks.11 (diffusers #13594); attnlab's does not."""
    dit = perturbed(tiny_config("dit", 2, "class", depth=12))
    assert [m.name for m in PAG().controls()[0].select(dit)] == ["blocks.1.self"]
    assert [m.name for m in PAG(layers="blocks.1").controls()[0].select(dit)] == ["blocks.1.self"]
    unet = _model("unet")[0]
    assert [m.name for m in PAG().controls()[0].select(unet)] == ["mid.attn.self"]


# A sample never depends on the batch around it


@pytest.mark.parametrize("backbone", ["unet", "dit"])
@pytest.mark.parametrize("make", [lambda: SAG(), lambda: PAG(adaptive_scale=0.002)], ids=["sag", "pag"])
def test_each_sample_equals_itself_drawn_alone(backbone, make):
    cfg = tiny_config(backbone, 2, "class")
    model = perturbed(cfg, seed=0).eval().double()
    cond = Condition(labels=torch.tensor([0, 1, 2]))
    # each row's noise from its own seed, as `sample(seeds=...)` draws it (here in float64)
    noise = torch.cat(
        [torch.randn(cfg.sample_shape(1), generator=torch.Generator().manual_seed(s)) for s in (5, 6, 7)]
    )

    def draw(rows):
        return sample(
            model,
            cfg.sample_shape(len(rows)),
            cond.index(rows),
            scheduler=make_scheduler("ddim"),
            steps=STEPS,
            guidance=3.0,
            x_T=noise[rows].double(),
            guidances=[make()],
        )

    batch = draw([0, 1, 2])
    alone = torch.cat([draw([i]) for i in range(3)])
    assert (batch - alone).abs().max() <= REL_TOL * batch.abs().max()
