"""T-GATE, Attend-and-Excite and the step caches against computations written here from their
reference code, on tiny attnlab models with fixed weights and seeds.

- T-GATE: HaozheLiu-ST/T-GATE, `tgate/SD.py` (the sampling loop) and `tgate/tgate_utils.py`
  (`tgate_scheduler`, `tgate_processor`).
- Attend-and-Excite: yuval-alaluf/Attend-and-Excite, `pipeline_attend_and_excite.py` and
  `utils/gaussian_smoothing.py`.

Nothing below asks attnlab's TGate, AttendExcite or AttnCache for an expected value: the sampling
loops, schedules, caches, losses, smoothing and refinement loops are written here. The models run
in float64, because Attend-and-Excite's gradient steps (size 20) amplify float32 rounding until two
correct implementations part by more than the tolerance. Tolerance: 1e-5 relative to the output's
scale; each control's own effect is checked to be at least 100 times that.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from models_util import CTX, perturbed, tiny_config

from attnlab.attention import attention_layers, control
from attnlab.conditioning import Condition
from attnlab.control import PAG, AttendExcite, AttnCache, TGate
from attnlab.diffusion import make_scheduler, sample
from attnlab.techniques import get

pytestmark = pytest.mark.usefixtures("one_thread", "float64")

RTOL = 1e-5  # relative to the output's scale
W = 2.0  # classifier-free guidance scale
MAIN = {"uncond", "cond"}  # the sampling loop's own chunks; anything else is a guidance's extra pass


@pytest.fixture(scope="module")
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _model(backbone: str):
    cfg = tiny_config(backbone, 2, "text", **({"patch": 2} if backbone == "dit" else {}))
    return perturbed(cfg, seed=0).eval().double(), cfg


def _batch(cfg, seed: int, lengths=(7, 6, 5)):
    """Text conditions of different lengths (padding masked), [CLS]-like first and [SEP]-like last
    tokens, and one noise row per sample."""
    g = torch.Generator().manual_seed(seed)
    b, n = len(lengths), max(lengths)
    tokens = torch.randn(b, n, CTX, generator=g)
    mask = torch.arange(n)[None] < torch.tensor(lengths)[:, None]  # (B, L)
    noise = torch.randn(cfg.sample_shape(b), generator=g)
    return Condition(tokens=tokens, mask=mask), noise


def _close(out, ref, effect_from=None):
    scale = ref.abs().max()
    err = (out - ref).abs().max() / scale
    assert err <= RTOL, f"relative error {err:.2e}"
    if effect_from is not None:
        effect = (effect_from - ref).abs().max() / scale
        assert effect >= 100 * RTOL, f"the control's effect {effect:.2e} is too small to test"


def _attnlab(model, cond, noise, steps, controls=(), guidances=(), guidance=W, seeds=None):
    with control(model, list(controls)):
        return sample(
            model,
            noise.shape,
            cond,
            scheduler=make_scheduler("ddim"),
            steps=steps,
            guidance=guidance,
            x_T=noise,
            seeds=seeds,
            guidances=list(guidances),
        )


# A sampling loop and attention processors written here


def _guided(model, x, t, cond, w):
    """One denoiser output with classifier-free guidance (Ho & Salimans 2022) in one batch."""
    b = x.shape[0]
    if w == 1.0:
        return model(x, t.expand(b), cond)
    uncond, text = model(torch.cat([x, x]), t.expand(2 * b), Condition.cat([cond.null_like(), cond])).chunk(2)
    return uncond + w * (text - uncond)


@contextmanager
def _processors(model, kinds, make):
    """Every `kinds` attention layer's forward replaced by make(layer, forward) for the block."""
    layers = [m for m in attention_layers(model).values() if m.kind in kinds]
    for layer in layers:
        layer.forward = make(layer, layer.forward)  # an instance attribute shadows the method
    try:
        yield layers
    finally:
        for layer in layers:
            del layer.forward


def _main_pass(model) -> bool:
    return set(model.bus_state.roles) <= MAIN


# T-GATE, written from tgate_scheduler / tgate_processor / SD.py


def tgate_flags(step, gate_step, sp_interval, fi_interval, warm_up):
    """`tgate_scheduler`: per step, (cache, reuse) for cross- ("ca") and self-attention ("sa"), and
    keep_shape (False at the last step before the gate: the cache is the mean of the CFG halves)."""
    if step < gate_step - 1:  # semantics planning
        if step < warm_up:
            sa = (False, False)
        elif step == warm_up:
            sa = (True, False)
        else:
            sa = (True, False) if step % sp_interval == 0 else (False, True)
        return {"ca": (False, False), "sa": sa, "keep_shape": True}
    if step == gate_step - 1:
        return {"ca": (True, False), "sa": (True, False), "keep_shape": False}
    sa = (True, False) if step % fi_interval == 0 else (False, True)  # fidelity improving
    return {"ca": (False, True), "sa": sa, "keep_shape": True}


def tgate_processor(flags_now, cache):
    """`tgate_processor`: hand back the layer's cache when told to reuse it, else compute (and cache)."""

    def make(layer, forward):
        def run(x, *args, **kw):
            flags = flags_now()
            if flags is None:
                return forward(x, *args, **kw)
            do_cache, reuse = flags["ca" if layer.kind == "cross" else "sa"]
            kept = cache.get(layer.name)
            if reuse and kept is not None:
                # the keep-CFG variant hands the gate's mean to both CFG halves
                return kept if len(kept) == len(x) else torch.cat([kept] * (len(x) // len(kept)))
            out = forward(x, *args, **kw)
            if do_cache:
                cache[layer.name] = out if flags["keep_shape"] else sum(out.chunk(2)) / 2
            return out

        return run

    return make


def tgate_reference(model, cond, noise, steps, gate_step, sp, fi, warm_up, drop_cfg=True):
    """SD.py's loop: CFG while i < gate_step, then the latent alone with no guidance formula.

    After the gate the reference passes the negative prompt; attnlab passes the prompt (text also
    reaches attnlab's models through a pooled vector), as replayed here.
    """
    sch = make_scheduler("ddim")
    sch.set_timesteps(steps)
    state, cache = {}, {}
    x = noise * sch.init_noise_sigma
    with (
        torch.no_grad(),
        _processors(model, ("self", "cross"), tgate_processor(lambda: state["flags"], cache)),
    ):
        for i, t in enumerate(sch.timesteps):
            state["flags"] = tgate_flags(i, gate_step, sp, fi, warm_up)
            w = W if i < gate_step or not drop_cfg else 1.0
            x = sch.step(_guided(model, x, t, cond, w), t, x).prev_sample
    return x


def _log_computations(model):
    """Per attention call that really computes (its q/k/v projection runs): (step, roles, kind, rows);
    per model call: (step, rows)."""
    calls, runs, handles = [], [], []
    st = model.bus_state
    for layer in attention_layers(model).values():
        proj = layer.to_kv if layer.kind == "cross" else layer.to_qkv
        handles.append(
            proj.register_forward_hook(
                lambda mod, inp, out, kind=layer.kind: calls.append(
                    (st.step, st.roles, kind, inp[0].shape[0])
                )
            )
        )
    handles.append(model.register_forward_hook(lambda mod, inp, out: runs.append((st.step, inp[0].shape[0]))))
    return calls, runs, handles


TGATE_CASES = {
    # the reference's defaults: gate_step=10, sp_interval=5, fi_interval=1, warm_up=2 of 25 steps
    "reference": (TGate(), 25, (10, 5, 1, 2), True),
    "intervals": (TGate(gate=0.5, sp_interval=3, fi_interval=2, warm_up=1), 12, (6, 3, 2, 1), True),
    "keep-cfg": (
        TGate(gate=0.5, sp_interval=3, fi_interval=2, warm_up=1, drop_cfg=False),
        12,
        (6, 3, 2, 1),
        False,
    ),
}


@pytest.mark.parametrize("backbone", ["unet", "dit"])
@pytest.mark.parametrize("case", list(TGATE_CASES))
def test_tgate_follows_the_reference_schedule(backbone, case):
    tg, steps, (gate_step, sp, fi, warm_up), drop = TGATE_CASES[case]
    assert tg.gate_step(steps) == gate_step
    model, cfg = _model(backbone)
    cond, noise = _batch(cfg, seed=1)
    b = len(noise)
    calls, runs, handles = _log_computations(model)
    gated_out = {}  # step -> cross layer -> output (hooks on the layers themselves)
    cross = [m for m in attention_layers(model).values() if m.kind == "cross"]
    for m in cross:
        handles.append(
            m.register_forward_hook(
                lambda mod, inp, out: gated_out.setdefault(model.bus_state.step, {}).__setitem__(
                    mod.name, out
                )
            )
        )
    out = _attnlab(model, cond, noise, steps, [tg], guidance=tg.guidance_schedule(W))
    for h in handles:
        h.remove()
    base = _attnlab(model, cond, noise, steps)
    ref = tgate_reference(model, cond, noise, steps, gate_step, sp, fi, warm_up, drop_cfg=drop)
    _close(out, ref, effect_from=base)

    n = {k: sum(m.kind == k for m in attention_layers(model).values()) for k in ("self", "cross")}
    for i in range(steps):
        flags = tgate_flags(i, gate_step, sp, fi, warm_up)
        rows = 2 * b if i < gate_step or not drop else b  # CFG off after the gate
        assert [r for s, r in runs if s == i] == [rows], i
        stored_self = any(tgate_flags(j, gate_step, sp, fi, warm_up)["sa"][0] for j in range(i))
        expect = {
            "cross": 0 if flags["ca"][1] else n["cross"],
            "self": 0 if flags["sa"][1] and stored_self else n["self"],
        }
        got = {k: [r for s, _, kind, r in calls if s == i and kind == k] for k in ("self", "cross")}
        assert {k: len(v) for k, v in got.items()} == expect, i
        assert all(r == rows for v in got.values() for r in v), i
    # after the gate, each cross layer hands back the mean of its uncond and cond outputs at gate - 1
    last = gated_out[gate_step - 1]
    for i in range(gate_step, steps):
        for name, o in gated_out[i].items():
            mean = (last[name][:b] + last[name][b:]) / 2
            torch.testing.assert_close(o, mean if drop else torch.cat([mean, mean]), rtol=0, atol=1e-12)


# Attend-and-Excite, written from pipeline_attend_and_excite.py


def smoothing_weights(size=3, sigma=0.5):
    """utils/gaussian_smoothing.py `GaussianSmoothing`: exp(-((x - mean) / (2 sigma))^2), summed to 1."""
    x = torch.arange(size, dtype=torch.float64)
    k1 = torch.exp(-(((x - (size - 1) / 2) / (2 * sigma)) ** 2))
    k2 = torch.outer(k1, k1)
    return k2 / k2.sum()  # (size, size)


def recorded_cross_maps(model, maps):
    """A processor that runs the explicit softmax path and keeps each layer's head-mean map."""

    def make(layer, forward):
        def run(x, context=None, context_mask=None, grid=None, **kw):
            out, p = layer.forward_math(x, context, context_mask, grid)  # p: (B, heads, N, L)
            maps.append(p.mean(1).transpose(1, 2).reshape(p.shape[0], p.shape[-1], *grid))  # (B, L, H, W)
            return out

        return run

    return make


def max_attention_per_index(model, z, t, cond, span, indices):
    """`_aggregate_and_get_max_attention_per_token`: the layers' maps averaged, text tokens
    softmaxed at x100 (special tokens and padding left out), each chosen token smoothed, its max."""
    maps = []
    with _processors(model, ("cross",), recorded_cross_maps(model, maps)):
        model(z, t, cond)
    a, b = span
    attention = torch.stack(maps).mean(0)[0]  # (L, H, W), one latent
    text = torch.softmax(attention[a:b] * 100, dim=0)
    k = smoothing_weights()[None, None]
    peaks = []
    for i in indices:
        image = F.pad(text[i - a][None, None], (1, 1, 1, 1), mode="reflect")
        peaks.append(F.conv2d(image, k).max())
    return peaks


def excite_loss(peaks):
    """`_compute_loss`: the most neglected token's 1 - max attention."""
    return max(max(0, 1.0 - p) for p in peaks)


def attend_and_excite_reference(model, cond, noise, span, indices, steps, thresholds, max_iter_to_alter):
    """`StableDiffusionAttendAndExcitePipeline.__call__` on one latent; returns it and, per refined
    step, the refinement loop's iteration count."""
    sch = make_scheduler("ddim")
    sch.set_timesteps(steps)
    scale_range = torch.linspace(1.0, 0.5, steps, dtype=torch.float64)
    x, iterations = noise * sch.init_noise_sigma, {}

    def loss_and_grad(latents, t):
        with torch.enable_grad():
            latents = latents.detach().requires_grad_(True)
            loss = excite_loss(max_attention_per_index(model, latents, t.expand(1), cond, span, indices))
            if not torch.is_tensor(loss):
                return loss, None
            return loss, torch.autograd.grad(loss, [latents])[0]

    for i, t in enumerate(sch.timesteps):
        step_size = 20.0 * math.sqrt(scale_range[i])  # scale_factor * sqrt(scale_range[i])
        if i < max_iter_to_alter:
            loss, grad = loss_and_grad(x, t)
            if i in thresholds and loss > 1.0 - thresholds[i]:  # _perform_iterative_refinement_step
                iteration, target_loss = 0, max(0, 1.0 - thresholds[i])
                while loss > target_loss:
                    iteration += 1
                    loss, grad = loss_and_grad(x, t)
                    if loss != 0:
                        x = x - step_size * grad
                    if iteration >= 20:  # max_refinement_steps
                        break
                iterations[i] = iteration
                loss, grad = loss_and_grad(x, t)  # "run one more time" at the refined latent
            if loss != 0:
                x = x - step_size * grad
        with torch.no_grad():
            x = sch.step(_guided(model, x, t, cond, W), t, x).prev_sample
    return x, iterations


STEPS_AE = 50
# the reference's thresholds {0: 0.05, 10: 0.5, 20: 0.8} and max_iter_to_alter=25, for 50 steps
THRESHOLDS = {0: 0.05, 10: 0.5, 20: 0.8}
CHOSEN = [[2, 4, 5], [1, 3], [2, 3]]  # per row: token positions to excite


def _spans(cond):
    return [(1, int(n) - 1) for n in cond.mask.sum(1)]  # text tokens between the first and the last


def test_attend_and_excite_refines_each_latent_as_the_reference():
    model, cfg = _model("dit")
    cond, noise = _batch(cfg, seed=2)
    ae = AttendExcite().bind(CHOSEN, _spans(cond))
    assert {round(f * STEPS_AE): v for f, v in zip(ae.refine_at, ae.thresholds)} == THRESHOLDS
    out = _attnlab(model, cond, noise, STEPS_AE, guidances=[ae])
    refs = [
        attend_and_excite_reference(
            model, cond.index(slice(r, r + 1)), noise[r : r + 1], span, CHOSEN[r], STEPS_AE, THRESHOLDS, 25
        )
        for r, span in enumerate(_spans(cond))
    ]
    base = _attnlab(model, cond, noise, STEPS_AE)
    _close(out, torch.cat([x for x, _ in refs]), effect_from=base)
    # the rows refine on their own (at step 10 each for a different count, one not at all), up to the cap
    counts = {i: [its.get(i, 0) for _, its in refs] for i in THRESHOLDS}
    assert {i: ae.refinements[i] for i in THRESHOLDS} == counts
    assert len(set(counts[10])) == 3 and 0 in counts[10] and max(counts[20]) == 20


def _each_alone(
    model, cond, noise, steps, make_controls=lambda: (), make_guidances=lambda r: (), seeds=None, **kw
):
    rows = []
    for r in range(len(noise)):
        c, seed = cond.index(slice(r, r + 1)), None if seeds is None else seeds[r : r + 1]
        rows.append(
            _attnlab(model, c, noise[r : r + 1], steps, make_controls(), make_guidances(r), seeds=seed, **kw)
        )
    return torch.cat(rows)


def test_attend_and_excite_sample_is_itself_drawn_alone():
    model, cfg = _model("unet")
    cond, noise = _batch(cfg, seed=2)
    spans, steps = _spans(cond), 10
    together = _attnlab(model, cond, noise, steps, guidances=[AttendExcite().bind(CHOSEN, spans)])
    alone = _each_alone(
        model, cond, noise, steps, make_guidances=lambda r: [AttendExcite().bind([CHOSEN[r]], [spans[r]])]
    )
    _close(together, alone, effect_from=_attnlab(model, cond, noise, steps))


def test_attend_and_excite_with_token_merging_is_itself_drawn_alone():
    """Token merging draws each row's destinations from its sample's seed, also on the excite pass
    over the rows still refining."""
    model, cfg = _model("unet")
    cond, noise = _batch(cfg, seed=2)
    spans, steps, seeds = _spans(cond), 10, [3, 4, 5]
    merge = lambda: [get("tome").build(ratio=0.5)]  # noqa: E731
    ae = AttendExcite().bind(CHOSEN, spans)
    together = _attnlab(model, cond, noise, steps, merge(), [ae], seeds=seeds)
    assert any(min(c) < max(c) for c in ae.refinements.values())  # excite passes over some rows only
    alone = _each_alone(
        model,
        cond,
        noise,
        steps,
        merge,
        lambda r: [AttendExcite().bind([CHOSEN[r]], [spans[r]])],
        seeds=seeds,
    )
    _close(together, alone, effect_from=_attnlab(model, cond, noise, steps, guidances=[ae], seeds=seeds))


@pytest.mark.parametrize("name", ["tgate", "attn_cache"])
def test_step_caches_sample_is_itself_drawn_alone(name):
    make = {"tgate": lambda: [TGate()], "attn_cache": lambda: [AttnCache(every=2, start=0.0)]}[name]
    guidance = TGate().guidance_schedule(W) if name == "tgate" else W
    model, cfg = _model("unet")
    cond, noise = _batch(cfg, seed=1)
    together = _attnlab(model, cond, noise, 12, make(), guidance=guidance)
    _close(together, _each_alone(model, cond, noise, 12, make, guidance=guidance))


# Step caches never act on guidance or refinement passes


def cache_processor(model, every, cache):
    """Attention caching as its docs say, on the loop's own passes only: recompute every `every`
    steps (from step 0, the window being the whole run), reuse the last output in between."""

    def make(layer, forward):
        def run(x, *args, **kw):
            st = model.bus_state
            key = (layer.name, st.roles, tuple(x.shape))
            if not _main_pass(model):
                return forward(x, *args, **kw)
            if st.step % every != 0 and key in cache:
                return cache[key]
            cache[key] = out = forward(x, *args, **kw)
            return out

        return run

    return make


def test_attention_cache_with_pag_leaves_the_perturbed_pass_fresh():
    model, cfg = _model("unet")
    cond, noise = _batch(cfg, seed=1)
    steps, cache = 8, AttnCache(every=2, start=0.0)
    calls, _, handles = _log_computations(model)
    out = _attnlab(model, cond, noise, steps, [cache], guidances=[PAG(scale=2.0)])
    for h in handles:
        h.remove()
    pag_alone = _attnlab(model, cond, noise, steps, guidances=[PAG(scale=2.0)])
    with _processors(model, ("self", "cross"), cache_processor(model, 2, {})):
        ref = _attnlab(model, cond, noise, steps, guidances=[PAG(scale=2.0)])
    _close(out, ref, effect_from=pag_alone)
    n_cross = sum(m.kind == "cross" for m in attention_layers(model).values())
    perturbed_steps = [s for s, roles, kind, _ in calls if kind == "cross" and not set(roles) <= MAIN]
    assert perturbed_steps == sorted(list(range(steps)) * n_cross)  # computed at every step
    assert cache.hits > 0


def test_tgate_with_attend_and_excite_leaves_the_excite_pass_fresh():
    model, cfg = _model("dit")
    cond, noise = _batch(cfg, seed=2)
    steps, spans = 10, _spans(cond)
    tg = TGate(gate=0.2)  # gated from step 2; Attend-and-Excite acts up to step 4
    out = _attnlab(
        model,
        cond,
        noise,
        steps,
        [tg],
        [AttendExcite().bind(CHOSEN, spans)],
        guidance=tg.guidance_schedule(W),
    )
    ae_alone = _attnlab(model, cond, noise, steps, guidances=[AttendExcite().bind(CHOSEN, spans)])
    gate_step = 2

    def flags_now():
        st = model.bus_state
        return tgate_flags(st.step, gate_step, 5, 1, 2) if _main_pass(model) else None

    schedule = lambda i, n: W if i < gate_step else 1.0  # noqa: E731
    with _processors(model, ("self", "cross"), tgate_processor(flags_now, {})):
        ref = _attnlab(
            model, cond, noise, steps, guidances=[AttendExcite().bind(CHOSEN, spans)], guidance=schedule
        )
    _close(out, ref, effect_from=ae_alone)
