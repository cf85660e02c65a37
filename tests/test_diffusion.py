import math

import pytest
import torch

from ddpm_cars import diffusion
from ddpm_cars.schedule import NoiseSchedule, cosine_betas


@pytest.fixture
def schedule():
    return NoiseSchedule.linear(1000)


def test_q_sample_is_eq_4(schedule):
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 100, 500, 999])
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].view(-1, 1, 1, 1)
    expected = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
    assert torch.allclose(diffusion.q_sample(schedule, x0, t, noise).double(), expected, atol=1e-6)


def test_predict_x0_inverts_q_sample(schedule):
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 300, 700])
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    assert torch.allclose(diffusion.predict_x0_from_eps(schedule, x_t, t, noise), x0, atol=1e-4)


def test_posterior_mean_of_predicted_x0_is_eq_11(schedule):
    x_t, eps = torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
    t = torch.tensor([1, 2, 50, 600, 999])
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    beta, ab = betas[t].view(-1, 1, 1, 1), torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    eq_11 = (x_t.double() - beta / (1 - ab).sqrt() * eps.double()) / (1 - beta).sqrt()
    via_x0 = diffusion.posterior_mean(schedule, diffusion.predict_x0_from_eps(schedule, x_t, t, eps), x_t, t)
    assert torch.allclose(via_x0.double(), eq_11, atol=1e-4)


def test_fixed_log_variance_choices(schedule):
    like, t = torch.zeros(3, 1), torch.tensor([0, 1, 999])
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    beta_tilde = lambda i: betas[i] * (1 - ab[i - 1]) / (1 - ab[i])  # noqa: E731 -- i >= 1
    # beta_tilde_1 = 0, so t = 0 borrows beta_tilde_2 (0-indexed: step 1) for both choices: the
    # decoder's variance (Ho et al.'s and improved-diffusion's code); elsewhere beta_t or beta_tilde_t
    beta = diffusion.fixed_log_variance(schedule, t, like, "beta").flatten()
    expected = torch.stack([beta_tilde(1), betas[1], betas[999]]).log()
    assert torch.allclose(beta.double(), expected, rtol=1e-6)
    tilde = diffusion.fixed_log_variance(schedule, t, like, "beta_tilde").flatten()
    expected = torch.stack([beta_tilde(1), beta_tilde(1), beta_tilde(999)]).log()
    assert torch.allclose(tilde.double(), expected, rtol=1e-6)


def _v_by_hand(x0, noise, t, betas):
    ab = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    return ab.sqrt() * noise.double() - (1 - ab).sqrt() * x0.double()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_each_target_converts_back_to_x0(prediction):
    schedule = NoiseSchedule.from_betas(cosine_betas(1000))
    x0, noise, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 400, 900])
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    target = diffusion.prediction_target(schedule, x0, t, noise, prediction)
    assert torch.allclose(diffusion.predict_x0(schedule, x_t, t, target, prediction), x0, atol=2e-3)
    x0_hat = diffusion.predict_x0(schedule, x_t, t, target, prediction)
    assert torch.allclose(
        diffusion.predict_eps(schedule, x_t, t[:, None, None, None].flatten(), x0_hat)[:3], noise[:3], atol=2e-2
    )


def test_v_target_matches_definition(schedule):
    x0, noise, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.tensor([0, 300, 999])
    expected = _v_by_hand(x0, noise, t, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    assert torch.allclose(diffusion.v_target(schedule, x0, t, noise).double(), expected, atol=1e-6)


def test_normal_kl_against_torch_distributions():
    m1, m2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    p = torch.distributions.Normal(m1, (0.5 * lv1).exp())
    q = torch.distributions.Normal(m2, (0.5 * lv2).exp())
    assert torch.allclose(diffusion.normal_kl(m1, lv1, m2, lv2), torch.distributions.kl_divergence(p, q))
    assert torch.allclose(diffusion.normal_kl(m1, lv1, m1, lv1), torch.zeros(50, dtype=torch.float64))


def _bin_probability(x: float, mean: float, std: float) -> float:
    """P(level x) under N(mean, std^2) by the error function, written out independently."""
    cdf = lambda v: 0.5 * (1 + math.erf((v - mean) / (std * math.sqrt(2))))  # noqa: E731
    lo = -math.inf if x <= -1 + 1e-6 else x - 1 / 255
    hi = math.inf if x >= 1 - 1e-6 else x + 1 / 255
    return (1.0 if hi == math.inf else cdf(hi)) - (0.0 if lo == -math.inf else cdf(lo))


def test_discretized_log_likelihood_against_independent_erf():
    levels = torch.tensor([0, 1, 64, 127, 128, 200, 254, 255], dtype=torch.float64)
    x = levels / 127.5 - 1
    mean = torch.tensor([-0.95, -1.0, -0.5, 0.0, 0.1, 0.5, 0.9, 0.7], dtype=torch.float64)
    std = torch.tensor([0.02, 0.1, 0.05, 0.2, 0.04, 0.3, 0.02, 0.1], dtype=torch.float64)
    got = diffusion.discretized_gaussian_log_likelihood(x, mean, (std**2).log())
    expected = [math.log(_bin_probability(*map(float, v))) for v in zip(x, mean, std)]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-6)


def test_discretized_likelihood_sums_to_one_over_the_256_levels():
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, std in [(0.0, 0.01), (0.3, 0.2), (-0.99, 0.05), (2.0, 1.0)]:
        log_p = diffusion.discretized_gaussian_log_likelihood(
            x, torch.full_like(x, mean), torch.full_like(x, 2 * math.log(std))
        )
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_kl_term_is_zero_when_p_equals_the_true_posterior(schedule):
    x0, noise, t = torch.rand(3, 3, 4, 4) * 2 - 1, torch.randn(3, 3, 4, 4), torch.tensor([1, 100, 999])
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    mean = diffusion.posterior_mean(schedule, x0, x_t, t)
    log_var = schedule.gather(schedule.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
    assert torch.allclose(diffusion.vlb_term(schedule, x0, x_t, t, mean, log_var), torch.zeros(3), atol=1e-5)


def test_vlb_term_at_t0_is_the_decoder_nll_in_bits(schedule):
    x0 = (torch.randint(0, 256, (2, 3, 4, 4)).double() / 127.5 - 1).float()
    mean, log_var = x0 + 0.003, torch.full_like(x0, math.log(1e-4))
    got = diffusion.vlb_term(schedule, x0, x0, torch.tensor([0, 0]), mean, log_var)
    expected = [
        -sum(math.log(_bin_probability(float(v), float(v) + 0.003, 0.01)) for v in img.flatten()) / (48 * math.log(2))
        for img in x0
    ]
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4)


def test_prior_term_against_closed_form(schedule):
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[-1]
    q = torch.distributions.Normal(ab.sqrt() * x0.double(), (1 - ab).sqrt())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).mean(1) / math.log(2)
    assert torch.allclose(diffusion.prior_bpd(schedule, x0).double(), kl, rtol=1e-4, atol=1e-7)


def test_learned_variance_interpolates_between_beta_and_beta_tilde(schedule):
    t = torch.tensor([5, 5, 5, 700])
    v = torch.tensor([1.0, -1.0, 0.0, 0.5]).view(-1, 1, 1, 1)
    got = diffusion.learned_log_variance(schedule, t, v).flatten()
    log_beta, log_tilde = schedule.betas[t].log(), schedule.posterior_variance[t].log()
    expected = torch.stack(
        [log_beta[0], log_tilde[1], (log_beta[2] + log_tilde[2]) / 2, 0.75 * log_beta[3] + 0.25 * log_tilde[3]]
    )
    assert torch.allclose(got, expected, atol=1e-5)
