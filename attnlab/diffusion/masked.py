"""Masked (absorbing-state) discrete diffusion for token sequences: the MDLM objective with the
log-linear schedule (Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models",
arXiv:2406.07524), its ancestral sampler, the few-step confidence-based unmasking of LLaDA (Nie et
al. 2025, arXiv:2502.09992), and classifier-free guidance over the logits.

A denoiser here is `model(z, t, cond) -> logits`: z (B, L) token ids with `mask_id` where masked,
t (B,) in [0, 1], logits (B, L, V). The samplers tell the attention bus each step and batch layout
as the continuous loop does (`attnlab.diffusion.sampling`), and call the same guidance plug-ins
(PAG's perturbed pass adds s (logits_cond - logits_perturbed)), so attention controls apply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from attnlab.attention import control, sample_seeds, sampling_step
from attnlab.conditioning import Condition
from attnlab.diffusion.guidance import Guidance
from attnlab.diffusion.sampling import model_outputs, noise_generators

EPS = 1e-3  # MDLM's schedule epsilon: alpha(1) = eps, so the all-masked state has a finite weight
SAMPLERS = ("ancestral", "confidence")
Sampler = Literal["ancestral", "confidence"]

# The process


def alpha(t: Tensor, eps: float = EPS) -> Tensor:
    """The log-linear schedule: probability a token is still unmasked at time t,
    alpha_t = exp(-sigma(t)) with sigma(t) = -log(1 - (1 - eps) t) (MDLM Sec. 3.5, LogLinearNoise)."""
    return 1 - (1 - eps) * t


def loss_weight(t: Tensor) -> Tensor:
    """The NELBO weight -alpha'_t / (1 - alpha_t) of the masked-token cross-entropy (MDLM Eq. 10);
    for the log-linear schedule it is (1 - eps) / ((1 - eps) t) = 1 / t."""
    return 1 / t


def mask_tokens(x0: Tensor, t: Tensor, mask_id: int, u: Tensor) -> Tensor:
    """z_t ~ q(z_t | x0) = Cat(alpha_t x0 + (1 - alpha_t) m) per token (MDLM Eq. 2), with the
    uniform draws `u` (B, L) given: a token is masked where u < 1 - alpha_t."""
    masked = u < (1 - alpha(t))[:, None]  # (B, L)
    return torch.where(masked, torch.full_like(x0, mask_id), x0)


def subs_log_probs(logits: Tensor, z: Tensor, mask_id: int) -> Tensor:
    """The SUBS parameterisation (MDLM Sec. 3.2.3): zero probability on the mask token, and an
    unmasked token carried over (log-probability 0 on itself). Returns (B, L, V) log-probabilities."""
    logits = logits.float().clone()
    logits[..., mask_id] = -math.inf
    logp = logits.log_softmax(dim=-1)
    carry = torch.full_like(logp, -math.inf).scatter(-1, z.unsqueeze(-1), 0.0)  # one-hot in log space
    return torch.where((z != mask_id).unsqueeze(-1), carry, logp)


def masked_nll(logp: Tensor, x0: Tensor, z: Tensor, t: Tensor, mask_id: int) -> Tensor:
    """(B,) the MDLM loss of each sequence in nats per token: the weighted cross-entropy on the masked
    tokens, (1 / t) * sum_l [z_l = m] (-log p(x0_l | z_t)) / L (MDLM Eq. 11, continuous time)."""
    nll = -logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1)  # (B, L)
    masked = z == mask_id
    return torch.where(masked, nll, torch.zeros_like(nll)).sum(1) * loss_weight(t) / x0.shape[1]


def draw_times(batch: int, generator: torch.Generator | None, eps: float = EPS) -> Tensor:
    """(B,) times in [eps, 1) from MDLM's low-discrepancy sampler: one uniform offset, spread evenly."""
    u = torch.rand(1, generator=generator)
    t = (u + torch.arange(batch) / batch) % 1
    return (1 - eps) * t + eps


def mdlm_loss(
    model: nn.Module,
    x0: Tensor,
    cond: Condition | None,
    *,
    mask_id: int,
    generator: torch.Generator | None = None,
    eps: float = EPS,
) -> Tensor:
    """The training loss of one batch: times, masks and the weighted cross-entropy, averaged.

    Args:
        model: `model(z, t, cond) -> (B, L, V)` logits.
        x0: (B, L) clean token ids.
        cond: the batch's conditions (with condition dropout applied), or None.
        mask_id: the mask token's id.
        generator: source of times and masks (a function of the step makes resumed runs exact).
    Returns:
        Scalar loss (nats per token; an upper bound on the negative log-likelihood).
    """
    t = draw_times(x0.shape[0], generator, eps).to(x0.device)
    u = torch.rand(x0.shape, generator=generator).to(x0.device)
    z = mask_tokens(x0, t, mask_id, u)
    logp = subs_log_probs(model(z, t, cond), z, mask_id)
    return masked_nll(logp, x0, z, t, mask_id).mean()


# Sampling


class _Draws:
    """Uniform draws per row: from each sample's own generator (a sample does not depend on its
    batch), or from one generator for the batch."""

    def __init__(self, batch: int, seeds: Sequence[int] | None, generator: torch.Generator | None):
        self.gens = noise_generators(seeds) if seeds is not None else None
        self.generator, self.batch = generator, batch

    def uniform(self, *shape: int, device) -> Tensor:
        if self.gens is None:
            return torch.rand(self.batch, *shape, generator=self.generator).to(device)
        return torch.stack([torch.rand(*shape, generator=g) for g in self.gens]).to(device)

    def gumbel(self, *shape: int, device) -> Tensor:
        u = self.uniform(*shape, device=device).clamp(1e-10, 1 - 1e-7)
        return -torch.log(-torch.log(u))


def guided_logits(
    model: nn.Module,
    z: Tensor,
    t: Tensor,
    cond: Condition | None,
    i: int,
    steps: int,
    w: float,
    guidances: Sequence[Guidance] = (),
) -> Tensor:
    """The step's logits: conditional, or with CFG u + w (c - u) from one [uncond; cond] batch (Ho &
    Salimans 2022, on logits as LLaDA does), plus the active guidance terms. A per-position constant
    does not change a softmax, so CFG on logits equals CFG on log-probabilities."""
    cfg = cond is not None and w != 1.0
    out = model_outputs(model, z, t, cond, i, steps, cfg)
    guided = out["uncond"] + w * (out["cond"] - out["uncond"]) if cfg else out["cond"]
    ctx = {"i": i, "steps": steps, "guidance": w, "prediction_type": "logits"}
    for g in guidances:
        if g.active(i, steps):
            with sampling_step(model, i, steps, t, roles=("cond",)):
                guided = guided + g.correction(model, z, t, cond, out, ctx)
    return guided


def ancestral_step(
    logp: Tensor, z: Tensor, t: float, s: float, mask_id: int, u: Tensor, gumbel: Tensor
) -> Tensor:
    """One reverse step t -> s < t (MDLM Eq. 7 with SUBS): a masked token stays masked with
    probability (1 - alpha_s) / (1 - alpha_t), else takes a token drawn from p(x0 | z_t); an
    unmasked token is kept. `u` (B, L) and `gumbel` (B, L, V) are the step's draws."""
    a_t, a_s = alpha(torch.tensor(t)), alpha(torch.tensor(s)) if s > 0 else torch.tensor(1.0)
    stay = u < (1 - a_s) / (1 - a_t)
    drawn = (logp + gumbel).argmax(-1)  # Gumbel-max: a draw from softmax(logp)
    return torch.where((z == mask_id) & ~stay, drawn, z)


def unmask_counts(masked: Tensor, steps: int) -> Tensor:
    """(B, steps) tokens to unmask per step: the masked count split evenly, the remainder first
    (LLaDA's `get_num_transfer_tokens`)."""
    n = masked.sum(1, keepdim=True)  # (B, 1)
    base, rem = n // steps, n % steps
    return base + (torch.arange(steps, device=masked.device)[None] < rem).long()


def confidence_step(
    logits: Tensor, z: Tensor, k: Tensor, mask_id: int, temperature: float, gumbel: Tensor
) -> Tensor:
    """LLaDA's low-confidence remasking: predict every masked token (argmax, or a Gumbel draw at
    `temperature`), keep the k (B,) most confident predictions per row, leave the rest masked."""
    logits = logits.float().clone()
    logits[..., mask_id] = -math.inf
    pred = (logits + temperature * gumbel).argmax(-1) if temperature > 0 else logits.argmax(-1)
    conf = logits.softmax(-1).gather(-1, pred.unsqueeze(-1)).squeeze(-1)  # (B, L)
    conf = torch.where(z == mask_id, conf, torch.full_like(conf, -math.inf))
    order = conf.argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)  # each position's place in its row's confidence order
    take = (rank < k[:, None]) & (z == mask_id)
    return torch.where(take, pred, z)


def sample_tokens(
    model: nn.Module,
    shape: Sequence[int],
    cond: Condition | None = None,
    *,
    mask_id: int,
    steps: int,
    sampler: Sampler = "ancestral",
    guidance: float | Callable[[int, int], float] = 1.0,
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    guidances: Sequence[Guidance] = (),
    callback: Callable[[dict[str, Any]], None] | None = None,
    x_T: Tensor | None = None,
    temperature: float = 1.0,
    progress: bool = False,
) -> Tensor:
    """Draw token sequences from a masked diffusion denoiser.

    Args:
        model: `model(z, t, cond) -> (B, L, V)` logits.
        shape: (B, L).
        cond: (B,) conditions, or None for an unconditional model.
        mask_id: the mask token's id.
        steps: reverse steps (the ancestral sampler's time grid t_i = 1 - i / steps; the confidence
            sampler unmasks about L / steps tokens a step).
        sampler: "ancestral" (MDLM) or "confidence" (LLaDA's low-confidence remasking).
        guidance: CFG scale (1: conditional only, 0: unconditional), or (i, steps) -> scale.
        seeds: one seed per sample; a sample's draws come from its own seed, whatever its batch.
        generator: one generator for the batch (when no seeds).
        guidances: guidance plug-ins (`attnlab.diffusion.guidance.Guidance`), e.g. PAG.
        callback: called each step with {"i", "t", "x" (tokens entering the step), "x0_pred"
            (each position's most likely token), "logits" (the guided logits)}.
        x_T: start from these tokens (mask_id where to generate); default all masked. Given tokens
            are kept.
        temperature: the confidence sampler's Gumbel temperature (0: argmax, as LLaDA's default).
    Returns:
        (B, L) token ids without masks.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if seeds is not None and len(seeds) != shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {shape[0]}")
    device = next(model.parameters()).device
    z = x_T.to(device).clone() if x_T is not None else torch.full(tuple(shape), mask_id, device=device)
    draws, scale_at = (
        _Draws(z.shape[0], seeds, generator),
        guidance if callable(guidance) else (lambda i, n: guidance),
    )
    counts = unmask_counts(z == mask_id, steps)
    extra = [c for g in guidances for c in g.controls()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), control(model, extra), sample_seeds(model, seeds):
            for i in range(steps):
                t, s = 1 - i / steps, 1 - (i + 1) / steps
                tb = torch.full((z.shape[0],), t, device=device)
                if sampler == "confidence":  # the time the masked share stands for
                    tb = (z == mask_id).float().mean(1).clamp(min=EPS)
                logits = guided_logits(model, z, tb, cond, i, steps, scale_at(i, steps), guidances)
                logp = subs_log_probs(logits, z, mask_id)
                if callback is not None:
                    callback({"i": i, "t": tb, "x": z, "x0_pred": logp.argmax(-1), "logits": logits})
                gumbel = draws.gumbel(*logits.shape[1:], device=device)
                if sampler == "ancestral":
                    u = draws.uniform(z.shape[1], device=device)
                    z = ancestral_step(logp, z, t, s, mask_id, u, gumbel)
                else:
                    z = confidence_step(logits, z, counts[:, i], mask_id, temperature, gumbel)
    finally:
        model.train(was_training)
    return z
