"""The one sampling loop: parity with a bare diffusers loop, CFG, guidance plug-ins, per-sample seeds."""

import pytest
import torch
from tiny_denoiser import TinyDenoiser

from attnlab.attention import Control
from attnlab.conditioning import Condition
from attnlab.diffusion import make_scheduler, sample


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyDenoiser().eval()


def _text_cond(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, 4, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0]] * b, dtype=torch.bool)
    return Condition(tokens=tokens, mask=mask)


@pytest.mark.parametrize("name", ["ddim", "dpm++", "ddpm"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loop_matches_bare_diffusers_loop(model, name, prediction):
    cond, x_T = _text_cond(), torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = sample(
        model,
        x_T.shape,
        cond,
        scheduler=make_scheduler(name, prediction_type=prediction),
        steps=6,
        x_T=x_T,
        generator=torch.Generator().manual_seed(9),
    )
    ref_sched, x, g = (
        make_scheduler(name, prediction_type=prediction),
        x_T.clone(),
        torch.Generator().manual_seed(9),
    )
    ref_sched.set_timesteps(6)
    with torch.no_grad():
        for t in ref_sched.timesteps:
            x = ref_sched.step(model(x, t.expand(3), cond), t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=0)


def test_guidance_one_equals_cond_only_and_cfg_differs(model):
    cond, sched = _text_cond(), make_scheduler("ddim")
    kw = dict(scheduler=sched, steps=5, seeds=[1, 2, 3])
    plain = sample(model, (3, 3, 8, 8), cond, guidance=1.0, **kw)
    model.calls.clear()
    guided = sample(model, (3, 3, 8, 8), cond, guidance=3.0, **kw)
    assert not torch.allclose(plain, guided)
    # every CFG call is one batch of uncond + cond rows, and the bus knew it
    assert {c[2] for c in model.calls} == {("uncond", "cond")} and {c[3] for c in model.calls} == {6}
    assert [c[0] for c in model.calls] == list(range(5))


def test_cfg_batch_at_guidance_near_one_equals_cond_only(model):
    """The CFG path (uncond and cond rows in one batch) at scale 1 + 1e-6 gives the cond-only result,
    so the rows are split in the right order."""
    cond, kw = _text_cond(), dict(steps=5, seeds=[1, 2, 3])
    plain = sample(model, (3, 3, 8, 8), cond, scheduler=make_scheduler("ddim"), guidance=1.0, **kw)
    model.calls.clear()
    cfg = sample(model, (3, 3, 8, 8), cond, scheduler=make_scheduler("ddim"), guidance=1.0 + 1e-6, **kw)
    assert {c[3] for c in model.calls} == {6}  # it did run the two-row-set batch
    torch.testing.assert_close(plain, cfg, atol=1e-4, rtol=0)


def test_cfg_with_identical_rows_equals_cond_only(model):
    """With the null condition as the condition, any guidance scale gives the cond-only result."""
    null = _text_cond().null_like()
    kw = dict(scheduler=make_scheduler("ddim"), steps=4, seeds=[4, 5, 6])
    torch.testing.assert_close(
        sample(model, (3, 3, 8, 8), null, guidance=1.0, **kw),
        sample(model, (3, 3, 8, 8), null, guidance=7.0, **kw),
        atol=1e-5,
        rtol=1e-5,
    )


class _Recorder(Control):
    def __init__(self):
        self.steps = []

    def after(self, call, out):
        self.steps.append((call.name, call.step, call.roles))
        return out


class _ZeroGuidance:
    """A guidance that installs a control, runs an extra model call and corrects by zero."""

    def __init__(self):
        self.recorder, self.seen = _Recorder(), []

    def controls(self):
        return [self.recorder]

    def active(self, i, steps):
        return i >= steps // 2

    def correction(self, model, x_in, t, cond, out, ctx):
        self.seen.append((ctx["i"], sorted(out), tuple(ctx["alpha_bar_t"].shape)))
        return 0 * model(x_in, t, cond)


def test_zero_guidance_changes_nothing_and_sees_its_window(model):
    cond = _text_cond()
    kw = dict(scheduler=make_scheduler("dpm++"), steps=6, seeds=[1, 2, 3], guidance=2.0)
    base = sample(model, (3, 3, 8, 8), cond, **kw)
    g = _ZeroGuidance()
    with_g = sample(model, (3, 3, 8, 8), cond, guidances=[g], **kw)
    torch.testing.assert_close(base, with_g, rtol=0, atol=0)
    assert [s[0] for s in g.seen] == [3, 4, 5]
    assert g.seen[0][1] == ["cond", "uncond"] and g.seen[0][2] == (3, 1, 1, 1)
    # the control was installed for the run and saw the step of each call; the extra call is cond-only
    assert ("attn", 3, ("cond",)) in g.recorder.steps and ("attn", 0, ("uncond", "cond")) in g.recorder.steps
    assert not model.attn.controls  # removed after the run


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_per_sample_seeds_do_not_depend_on_batch(model, name):
    cond = _text_cond(4)
    kw = dict(scheduler=make_scheduler(name), steps=5, guidance=2.0)
    batch = sample(model, (4, 3, 8, 8), cond, seeds=[10, 11, 12, 13], **kw)
    alone = sample(model, (1, 3, 8, 8), cond.index(slice(2, 3)), seeds=[12], **kw)
    torch.testing.assert_close(batch[2:3], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch[1], batch[2])


def test_callback_sees_every_step_with_x0_prediction(model):
    events = []
    sample(
        model,
        (2, 3, 8, 8),
        _text_cond(2),
        scheduler=make_scheduler("ddim"),
        steps=4,
        seeds=[0, 1],
        callback=events.append,
    )
    assert [e["i"] for e in events] == [0, 1, 2, 3]
    assert all(e["x0_pred"].shape == (2, 3, 8, 8) for e in events)
    assert events[0]["t"] > events[-1]["t"]
