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
