"""The training objective against diffusers' own forward process, and its analytic identities."""

import pytest
import torch
from diffusers import DDPMScheduler
from tiny_denoiser import TinyDenoiser

from attnlab.diffusion import (
    add_noise,
    alphas_cumprod,
    diffusion_loss,
    make_scheduler,
    min_snr_weight,
    predict_eps,
    predict_x0,
    target,
)
from attnlab.errors import ConfigError


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    return x0, noise, torch.tensor([0, 10, 500, 999])


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_forward_process_and_v_target_match_diffusers(batch, schedule):
    x0, noise, t = batch
    ref = DDPMScheduler(beta_schedule=schedule)
    ab = alphas_cumprod(beta_schedule=schedule)[t]
    torch.testing.assert_close(add_noise(x0, noise, ab), ref.add_noise(x0, noise, t))
    torch.testing.assert_close(target("v_prediction", x0, noise, ab), ref.get_velocity(x0, noise, t))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_true_target_recovers_x0_and_eps(batch, prediction):
    x0, noise, t = batch
    ab = alphas_cumprod()[t[:3]].double()  # t=999 has alpha_bar ~ 4e-5; x0 from eps is ill-posed there
    x0, noise = x0[:3].double(), noise[:3].double()
    x_t, out = add_noise(x0, noise, ab), target(prediction, x0, noise, ab)
    torch.testing.assert_close(predict_x0(prediction, x_t, out, ab), x0)
    torch.testing.assert_close(predict_eps(prediction, x_t, out, ab), noise)


def test_min_snr_weights():
    ab = torch.tensor([0.999, 0.5, 0.01])
    snr = ab / (1 - ab)
    w_eps, w_v = min_snr_weight("epsilon", ab, 5.0), min_snr_weight("v_prediction", ab, 5.0)
    torch.testing.assert_close(w_eps, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w_eps[0] < 1 and w_eps[1] == 1 and w_eps[2] == 1  # only high-SNR (easy) steps are down-weighted
    torch.testing.assert_close(w_v, w_eps * snr / (snr + 1))


def test_loss_is_a_function_of_the_generator():
    torch.manual_seed(0)
    model, x0 = TinyDenoiser(), torch.rand(4, 3, 8, 8) * 2 - 1
    ab = alphas_cumprod()

    def loss(seed):
        g = torch.Generator().manual_seed(seed)
        return diffusion_loss(model, x0, None, ab, prediction="v_prediction", generator=g, min_snr_gamma=5.0)

    assert loss(1) == loss(1) and loss(1) != loss(2)
    loss(1).backward()
    assert model.inp.weight.grad is not None


def test_bad_scheduler_names_are_config_errors():
    with pytest.raises(ConfigError, match="sampler='euler'.*'ddim'"):
        make_scheduler("euler")
    with pytest.raises(ConfigError, match="prediction_type='x0'"):
        make_scheduler("ddim", prediction_type="x0")


class Oracle(torch.nn.Module):
    """Knows x0, so it reads the drawn noise off x_t and returns the true target plus `c`; it keeps
    the timesteps it was asked about."""

    def __init__(self, x0, ab, prediction, c):
        super().__init__()
        self.x0, self.ab, self.prediction, self.c, self.t = x0, ab, prediction, c, None

    def forward(self, x_t, t, cond):
        self.t, ab = t, self.ab[t].view(-1, 1, 1, 1)
        noise = (x_t - ab.sqrt() * self.x0) / (1 - ab).sqrt()  # x_t = sqrt(ab) x0 + sqrt(1 - ab) eps
        eps_or_v = noise if self.prediction == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * self.x0
        return eps_or_v + self.c


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [None, 5.0])
@pytest.mark.parametrize("c", [0.0, 0.3])
def test_loss_of_the_target_plus_c_is_c_squared_times_the_mean_weight(prediction, gamma, c):
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(16, 3, 4, 4, generator=g) * 2 - 1).double()
    ab = alphas_cumprod().double()
    oracle = Oracle(x0, ab, prediction, c)
    loss = diffusion_loss(oracle, x0, None, ab, prediction=prediction, generator=g, min_snr_gamma=gamma)
    snr = ab[oracle.t] / (1 - ab[oracle.t])
    if gamma is None:
        weight = torch.ones_like(snr)
    else:  # Hang et al. 2023: min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v
        weight = torch.minimum(snr, torch.tensor(gamma, dtype=snr.dtype))
        weight = weight / (snr if prediction == "epsilon" else snr + 1)
        assert weight.min() < weight.max()  # the draw has steps on both sides of gamma
    torch.testing.assert_close(loss, c**2 * weight.mean(), atol=1e-12, rtol=1e-9)
