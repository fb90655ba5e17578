"""The denoising objective: eps prediction (Ho et al. 2020), v prediction (Salimans & Ho 2022) and
min-SNR-gamma loss weighting (Hang et al. 2023)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnlab.conditioning import Condition


def _bcast(a: Tensor, like: Tensor) -> Tensor:
    return a.view(-1, *[1] * (like.dim() - 1)).to(like.dtype)  # (B, 1, ..., 1)


def add_noise(x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps  (Ho et al. 2020, Eq. 4); alpha_bar is (B,)."""
    ab = _bcast(alpha_bar, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def target(prediction: str, x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """What the model is trained to output: eps, or v = sqrt(ab) eps - sqrt(1 - ab) x0."""
    if prediction == "epsilon":
        return noise
    ab = _bcast(alpha_bar, x0)
    return ab.sqrt() * noise - (1 - ab).sqrt() * x0


def predict_x0(prediction: str, x_t: Tensor, out: Tensor, alpha_bar: Tensor) -> Tensor:
    """The clean sample implied by a model output at noise level alpha_bar."""
    ab = _bcast(alpha_bar, x_t)
    if prediction == "epsilon":
        return (x_t - (1 - ab).sqrt() * out) / ab.sqrt()
    return ab.sqrt() * x_t - (1 - ab).sqrt() * out


def predict_eps(prediction: str, x_t: Tensor, out: Tensor, alpha_bar: Tensor) -> Tensor:
    """The noise implied by a model output (guidance terms that reason in eps space use it)."""
    if prediction == "epsilon":
        return out
    ab = _bcast(alpha_bar, x_t)
    return (1 - ab).sqrt() * x_t + ab.sqrt() * out


def min_snr_weight(prediction: str, alpha_bar: Tensor, gamma: float) -> Tensor:
    """Per-sample loss weight min(SNR, gamma) / SNR for eps, / (SNR + 1) for v (Hang et al. 2023)."""
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction == "epsilon" else clipped / (snr + 1)


def diffusion_loss(
    model: nn.Module,
    x0: Tensor,
    cond: Condition | None,
    alphas_cumprod: Tensor,
    *,
    prediction: str = "epsilon",
    generator: torch.Generator | None = None,
    min_snr_gamma: float | None = None,
) -> Tensor:
    """The training loss of one batch: a uniform timestep and fresh noise per sample, mean squared error.

    Args:
        model: denoiser `model(x_t, t, cond)`.
        x0: (B, C, *spatial) clean data in [-1, 1].
        cond: the batch's conditions (already with condition dropout applied), or None.
        alphas_cumprod: (T,) alpha_bar of the training schedule.
        prediction: "epsilon" or "v_prediction".
        generator: source of t and noise (a function of the step makes resumed runs bit-identical).
        min_snr_gamma: if given, weight each sample by min-SNR-gamma (5 is the paper's choice).
    Returns:
        Scalar loss.
    """
    b, device = x0.shape[0], x0.device
    t = torch.randint(0, alphas_cumprod.shape[0], (b,), generator=generator).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    ab = alphas_cumprod.to(device)[t]
    out = model(add_noise(x0, noise, ab), t, cond)
    per_sample = (out - target(prediction, x0, noise, ab)).pow(2).flatten(1).mean(1)  # (B,)
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(prediction, ab, min_snr_gamma)
    return per_sample.mean()
