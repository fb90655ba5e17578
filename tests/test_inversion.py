"""Inversion of real images on the trained 16 px shapes model: each method against its paper's
equations written here, reconstruction with no edit, an edit to the source caption, a mask."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from attnlab.conditioning import get_text_encoder
from attnlab.control import PromptToPrompt
from attnlab.control.edit import MaskBlend, edit_image, text_condition
from attnlab.control.inversion import TextDenoiser, invert, psnr, replay
from attnlab.data import build_dataset
from attnlab.diffusion import scheduler_for
from attnlab.errors import ConfigError
from attnlab.train import load_model

MODEL = Path(__file__).parent / "data" / "shapes16-text"
STEPS = 6


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model, cfg = load_model(MODEL)
    item = build_dataset(cfg.data, "eval")[0]  # "a yellow square above a blue triangle"
    return model, cfg, get_text_encoder(), item


def _den(setup):
    model, cfg, enc, item = setup
    cond = text_condition(enc, [item["text"]])
    return TextDenoiser(model, cond), cond, item["x"][None], scheduler_for(cfg, "ddim")


# The paper's equations, written from their definitions (v-prediction: Salimans & Ho 2022)


def alpha_bar(t: int) -> float:
    """squaredcos_cap_v2 (Nichol & Dhariwal 2021, Eq. 17 with s = 0.008, betas capped at 0.999)."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ab = 1.0
    for i in range(t + 1):
        ab *= 1 - min(1 - f((i + 1) / 1000) / f(i / 1000), 0.999)
    return ab


def trailing(steps: int) -> list[int]:
    """Sampler timesteps, trailing spacing (Lin et al. 2024): round(1000 - i * 1000 / steps) - 1."""
    return [round(1000 - i * 1000 / steps) - 1 for i in range(steps)]


def x0_eps(v, x, ab):
    return ab**0.5 * x - (1 - ab) ** 0.5 * v, ab**0.5 * v + (1 - ab) ** 0.5 * x


def test_ddim_inversion_follows_the_inverted_ddim_update(setup):
    """x_t = sqrt(ab_t) x0_hat + sqrt(1 - ab_t) eps_hat, both read off the model at (x_{t-1}, t)."""
    den, cond, x0, sch = _den(setup)
    inv = invert(den, x0, "ddim", scheduler=sch, steps=STEPS, guidance=1.0)
    x = x0
    with torch.no_grad():
        for t in reversed(trailing(STEPS)):
            x0_hat, eps_hat = x0_eps(
                den.cond(x, torch.tensor([t])), x, alpha_bar(t - 1000 // STEPS) if t >= 1000 // STEPS else 1.0
            )
            x = alpha_bar(t) ** 0.5 * x0_hat + (1 - alpha_bar(t)) ** 0.5 * eps_hat
    torch.testing.assert_close(inv.x_T, x, atol=1e-4, rtol=1e-4)


def test_ddpm_noise_maps_are_the_papers_and_reconstruct_exactly(setup):
    """Eq. 5-6 of Huberman-Spiegelglas et al.: x_t ~ q(x_t | x_0) independently, z_t = (x_{t-1} -
    mu_t(x_t)) / sigma_t under the guided prediction; sampling with them returns the input."""
    model, *_ = setup
    den, cond, x0, sch = _den(setup)
    w = 2.0
    inv = invert(den, x0, "ddpm", scheduler=sch, steps=STEPS, guidance=w, seed=3)
    ts = trailing(STEPS)
    eps = torch.randn((STEPS, *x0.shape), generator=torch.Generator().manual_seed(3))
    xs = [alpha_bar(t) ** 0.5 * x0 + (1 - alpha_bar(t)) ** 0.5 * e for t, e in zip(ts, eps)] + [x0]
    torch.testing.assert_close(inv.x_T, xs[0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for i, t in enumerate(ts):
            ab, ab_prev = alpha_bar(t), alpha_bar(t - 1000 // STEPS) if i < STEPS - 1 else 1.0
            c, u = den.cond(xs[i], torch.tensor([t])), den.uncond(xs[i], torch.tensor([t]))
            x0_hat, eps_hat = x0_eps(u + w * (c - u), xs[i], ab)
            var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)  # DDPM posterior variance, Eq. 7 of Ho et al.
            mu = ab_prev**0.5 * x0_hat + (1 - ab_prev - var) ** 0.5 * eps_hat
            torch.testing.assert_close(
                inv.noise[i], (xs[i + 1] - mu)[0], atol=1e-3, rtol=0
            )  # float32 schedule
    x = replay(model, cond, inv)
    assert (x[0] - x0[0]).abs().max() < 1e-4  # float error only
    assert psnr(x[0], x0[0]) > 80


def test_null_text_retraces_guided_sampling_where_ddim_drifts(setup):
    model, *_ = setup
    den, cond, x0, sch = _den(setup)
    got, steps = {}, 20  # the pivot (DDIM at guidance 1) needs steps enough to hold
    for method in ("ddim", "null-text"):
        inv = invert(den, x0, method, scheduler=sch, steps=steps, guidance=3.0)
        got[method] = psnr(replay(model, cond, inv)[0], x0[0])
    assert inv.nulls.shape[0] == steps and inv.model_calls > 2 * steps
    assert got["null-text"] > 25 and got["null-text"] > got["ddim"] + 5, got


@pytest.mark.parametrize("method", ["ddpm", "null-text", "ddim"])
def test_an_edit_to_the_source_caption_is_the_reconstruction(setup, method):
    model, cfg, enc, item = setup
    r = edit_image(
        model, enc, item["x"], item["text"], [item["text"]], PromptToPrompt(blend=("square",)),
        method=method, scheduler=scheduler_for(cfg, "ddim"), steps=STEPS, guidance=2.0,
    )  # fmt: skip
    torch.testing.assert_close(r.edits[0], r.reconstruction, atol=1e-4, rtol=0)
    alone = edit_image(
        model, enc, item["x"], item["text"], [], None, method=method, scheduler=scheduler_for(cfg, "ddim"),
        steps=STEPS, guidance=2.0,
    )  # fmt: skip
    torch.testing.assert_close(alone.reconstruction, r.reconstruction, atol=1e-4, rtol=0)
    assert alone.psnr == pytest.approx(r.psnr, abs=1e-2)


def test_a_mask_restricted_edit_changes_nothing_outside_the_mask(setup):
    model, cfg, enc, item = setup
    mask = item["masks"][1][None].float()  # the triangle
    edit = item["text"].replace("blue triangle", "red triangle")
    r = edit_image(
        model, enc, item["x"], item["text"], [edit], PromptToPrompt(), method="ddpm",
        scheduler=scheduler_for(cfg, "ddim"), steps=STEPS, guidance=2.0, mask=mask,
    )  # fmt: skip
    outside = (1 - mask).bool().expand_as(item["x"])
    assert (r.edits[0] - item["x"])[outside].abs().max() < 1e-4
    assert (r.edits[0] - item["x"])[~outside].abs().max() > 0.1  # the triangle did change
    # the blend alone already holds the outside at the (exact) reconstruction, before any paste
    den, cond, x0, sch = _den(setup)
    inv = invert(den, x0, "ddpm", scheduler=sch, steps=STEPS, guidance=2.0)
    p2p = PromptToPrompt().bind([enc.tokens_of(p) for p in (item["text"], edit)], lambda r, w: [])
    x = replay(model, text_condition(enc, [item["text"], edit]), inv, [p2p, MaskBlend(mask[None])])
    assert (x[1] - item["x"])[outside].abs().max() < 1e-4


@pytest.mark.parametrize("null_tokens", ["one", "all"])
def test_the_null_embedding_starts_as_the_models_own_null_condition(setup, null_tokens):
    """Before any optimisation, the unconditional prediction under the embedding to optimise is the
    model's prediction under its null condition (a learned empty token, padding masked): 'all'
    copies that token to every caption position, all attended, jittered by 1e-3."""
    model, cfg, enc, item = setup
    cond = text_condition(enc, [item["text"]])
    den = TextDenoiser(model, cond, null_tokens)
    null = den.null()
    n = 1 if null_tokens == "one" else cond.tokens.shape[1]
    assert null.shape == (1, n, cond.tokens.shape[-1])
    x, t = torch.randn_like(item["x"][None]), torch.tensor([500])
    with torch.no_grad():
        own = model(x, t, cond.null_like())
        got = den.uncond(x, t, null)
        moved = den.uncond(x, t, null + 0.5 * torch.randn_like(null))
    torch.testing.assert_close(got, own, atol=2e-3, rtol=0)
    assert (moved - own).abs().max() > 1e-2  # the embedding is what the prediction reads


def test_null_tokens_are_checked_and_each_choice_inverts(setup):
    model, cfg, enc, item = setup
    cond = text_condition(enc, [item["text"]])
    with pytest.raises(ConfigError, match="null_tokens"):
        TextDenoiser(model, cond, null_tokens="some")
    edit = item["text"].replace("yellow", "red")
    for null_tokens, n in (("one", 1), ("all", cond.tokens.shape[1])):
        r = edit_image(
            model, enc, item["x"], item["text"], [edit], PromptToPrompt(blend=("square",)), method="null-text",
            scheduler=scheduler_for(cfg, "ddim"), steps=STEPS, guidance=2.0, null_tokens=null_tokens,
        )  # fmt: skip
        assert r.inversion.info["null_tokens"] == null_tokens
        assert r.inversion.nulls.shape[1:] == (1, n, cond.tokens.shape[-1])
        assert torch.isfinite(r.edits[0]).all()
