"""Masked diffusion (MDLM, LLaDA) against hand-computed cases: the forward process, the loss, the
samplers' fixed points, classifier-free guidance at scales 0 and 1."""

import math

import pytest
import torch
from tokens_util import tiny_tokens

from attnlab.conditioning import Condition
from attnlab.diffusion.masked import (
    alpha,
    guided_logits,
    mask_tokens,
    masked_nll,
    mdlm_loss,
    sample_tokens,
    subs_log_probs,
    unmask_counts,
)

MASK = 1
V, L = 12, 6


def tiny(cond="text", seed=0, **kw):
    # the zero output layer would make every logit equal: perturbed
    return tiny_tokens(V, L, context_dim=5, cond=cond, seed=seed, noise=0.3, **kw).eval()


def condition(b=3):
    ids = torch.tensor([[1, 2, 3], [4, 2, 0], [3, 3, 1]])[:b]
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])[:b]
    return Condition(tokens=ids, mask=mask)


class Fixed(torch.nn.Module):
    """A denoiser that returns the same logits whatever it is given."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z, t, cond=None):
        return self.logits.expand(z.shape[0], -1, -1) + 0 * self.w


def test_log_linear_schedule_and_forward_process_by_hand():
    # alpha_t = 1 - (1 - eps) t: 1 at t = 0, eps at t = 1
    assert alpha(torch.tensor(0.0)).item() == 1.0
    assert alpha(torch.tensor(1.0)).item() == pytest.approx(1e-3, rel=1e-4)
    x0 = torch.tensor([[5, 6, 7, 8]])
    # at t = 0.5 a token is masked with probability 1 - alpha = 0.4995: draws below it mask
    u = torch.tensor([[0.4, 0.6, 0.4994, 0.4996]])
    assert mask_tokens(x0, torch.tensor([0.5]), MASK, u).tolist() == [[MASK, 6, MASK, 8]]
    assert mask_tokens(x0, torch.tensor([0.0]), MASK, u).tolist() == [[5, 6, 7, 8]]


def test_subs_parameterisation_zero_mask_probability_and_carry_over():
    logits = torch.zeros(1, 2, 4)
    logp = subs_log_probs(logits, torch.tensor([[MASK, 3]]), MASK)
    assert logp[0, 0].exp().tolist() == pytest.approx([1 / 3, 0.0, 1 / 3, 1 / 3])  # masked: no mask token
    assert logp[0, 1].exp().tolist() == [0.0, 0.0, 0.0, 1.0]  # unmasked: itself


def test_mdlm_loss_by_hand():
    """x0 = [2, 3], z = [m, 3], t = 1/2; position 0's logits [0, 0, log 3, 0] give p(2) = 3 / 5 once
    the mask is excluded, so the loss is (1 / t) * (-log 3/5) / L = 2 log(5/3) / 2 = log(5/3)."""
    logits = torch.tensor([[[0.0, 0.0, math.log(3), 0.0], [0.0, 0.0, 0.0, 9.0]]])
    z, x0, t = torch.tensor([[MASK, 3]]), torch.tensor([[2, 3]]), torch.tensor([0.5])
    loss = masked_nll(subs_log_probs(logits, z, MASK), x0, z, t, MASK)
    assert loss.item() == pytest.approx(math.log(5 / 3), rel=1e-6)
    # the unmasked position adds nothing whatever the model says about it
    logits[0, 1] = torch.tensor([5.0, 0.0, -3.0, -9.0])
    assert masked_nll(subs_log_probs(logits, z, MASK), x0, z, t, MASK).item() == pytest.approx(
        math.log(5 / 3)
    )


def test_mdlm_loss_of_a_uniform_model_is_the_masked_share_times_log_v():
    """A model with uniform logits over the V - 1 non-mask tokens costs log(V - 1) per masked token;
    with weight 1/t and E[masked share] = (1 - eps) t, the expected loss is (1 - eps) log(V - 1)."""
    model = Fixed(torch.zeros(1, 64, V))
    x0 = torch.randint(2, V, (512, 64), generator=torch.Generator().manual_seed(0))
    loss = mdlm_loss(model, x0, None, mask_id=MASK, generator=torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx((1 - 1e-3) * math.log(V - 1), rel=0.02)


@pytest.mark.parametrize("sampler", ["ancestral", "confidence"])
def test_a_sampler_with_every_token_given_returns_them(sampler):
    model = tiny()
    given = torch.randint(2, V, (3, L), generator=torch.Generator().manual_seed(3))
    out = sample_tokens(
        model,
        (3, L),
        condition(),
        mask_id=MASK,
        steps=4,
        sampler=sampler,
        x_T=given,
        seeds=[0, 1, 2],
        guidance=2.0,
    )
    assert torch.equal(out, given)


@pytest.mark.parametrize("sampler", ["ancestral", "confidence"])
def test_samplers_unmask_everything_and_keep_given_tokens(sampler):
    model = tiny()
    start = torch.full((3, L), MASK)
    start[:, 0] = 7
    out = sample_tokens(
        model,
        (3, L),
        condition(),
        mask_id=MASK,
        steps=3,
        sampler=sampler,
        x_T=start,
        seeds=[0, 1, 2],
        temperature=1.0,
    )
    assert (out != MASK).all() and (out[:, 0] == 7).all()


def test_confidence_sampler_unmasks_the_planned_count_each_step():
    assert unmask_counts(torch.ones(2, 7, dtype=torch.bool), 3).tolist() == [[3, 2, 2], [3, 2, 2]]
    model, seen = tiny(), []
    sample_tokens(
        model,
        (3, L),
        condition(),
        mask_id=MASK,
        steps=3,
        sampler="confidence",
        callback=lambda e: seen.append((e["x"] == MASK).sum(1).tolist()),
    )
    assert seen == [[6, 6, 6], [4, 4, 4], [2, 2, 2]]


@pytest.mark.parametrize("sampler", ["ancestral", "confidence"])
def test_a_sample_depends_on_its_seed_not_its_batch(sampler):
    model = tiny()
    both = sample_tokens(
        model, (3, L), condition(), mask_id=MASK, steps=4, sampler=sampler, seeds=[5, 6, 7], temperature=1.0
    )
    one = sample_tokens(
        model,
        (1, L),
        condition().index(slice(1, 2)),
        mask_id=MASK,
        steps=4,
        sampler=sampler,
        seeds=[6],
        temperature=1.0,
    )
    assert torch.equal(both[1:2], one)


def _rows_seen(model):
    sizes = []
    handle = model.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    return sizes, handle


@pytest.mark.parametrize("sampler", ["ancestral", "confidence"])
def test_cfg_at_scale_1_is_the_conditional_sampler(sampler):
    model, cond = tiny(), condition()
    sizes, handle = _rows_seen(model)
    a = sample_tokens(
        model, (3, L), cond, mask_id=MASK, steps=4, sampler=sampler, guidance=1.0, seeds=[0, 1, 2]
    )
    handle.remove()
    assert set(sizes) == {3}  # no unconditional rows were run
    b = sample_tokens(
        model,
        (3, L),
        cond,
        mask_id=MASK,
        steps=4,
        sampler=sampler,
        guidance=lambda i, n: 1.0,
        seeds=[0, 1, 2],
    )
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", ["ancestral", "confidence"])
def test_cfg_at_scale_0_is_the_unconditional_sampler(sampler):
    model, cond = tiny(), condition()
    sizes, handle = _rows_seen(model)
    guided = sample_tokens(
        model, (3, L), cond, mask_id=MASK, steps=4, sampler=sampler, guidance=0.0, seeds=[0, 1, 2]
    )
    handle.remove()
    assert set(sizes) == {6}  # [uncond; cond] in one batch
    uncond = sample_tokens(
        model, (3, L), cond.null_like(), mask_id=MASK, steps=4, sampler=sampler, seeds=[0, 1, 2]
    )
    assert torch.equal(guided, uncond)
    conditional = sample_tokens(model, (3, L), cond, mask_id=MASK, steps=4, sampler=sampler, seeds=[0, 1, 2])
    assert not torch.equal(uncond, conditional)  # the condition matters, so the check above can fail


def test_cfg_logits_are_u_plus_w_times_c_minus_u():
    model, cond = tiny(), condition()
    z = torch.full((3, L), MASK)
    z[:, 2] = 4
    t = torch.full((3,), 0.7)
    with torch.no_grad():
        c, u = model(z, t, cond), model(z, t, cond.null_like())
        g = guided_logits(model, z, t, cond, 0, 4, 2.5)
    torch.testing.assert_close(g, u + 2.5 * (c - u), rtol=1e-4, atol=1e-4)


def test_bad_sampler_and_seed_count_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample_tokens(model, (2, L), None, mask_id=MASK, steps=2, sampler="greedy")
    with pytest.raises(ValueError, match="got 1 seeds for a batch of 2"):
        sample_tokens(model, (2, L), None, mask_id=MASK, steps=2, seeds=[0])
