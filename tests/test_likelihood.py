import math

import pytest
import torch

from ddpm_cars.config import DiffusionConfig, SampleConfig
from ddpm_cars.evaluation import bits_per_dim
from ddpm_cars.schedule import NoiseSchedule


class Oracle(torch.nn.Module):
    """Knows the one image of the dataset, so it predicts the noise of any x_t exactly."""

    def __init__(self, x0: torch.Tensor, schedule: NoiseSchedule):
        super().__init__()
        self.x0, self.schedule = x0, schedule

    def forward(self, x_t, t):
        ab = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * self.x0) / (1 - ab).sqrt()


class Zero(torch.nn.Module):
    def forward(self, x_t, t):
        return torch.zeros_like(x_t)


def _image(seed: int = 0) -> torch.Tensor:
    levels = torch.randint(0, 256, (1, 3, 4, 4), generator=torch.Generator().manual_seed(seed))
    return levels.float() / 127.5 - 1


def _log_bin_probability(x: float, mean: float, std: float) -> float:
    cdf = lambda v: 0.5 * (1 + math.erf((v - mean) / (std * math.sqrt(2))))  # noqa: E731
    hi = 1.0 if x > 0.999 else cdf(x + 1 / 255)
    lo = 0.0 if x < -0.999 else cdf(x - 1 / 255)
    return math.log(hi - lo)


def test_oracle_bound_is_prior_plus_decoder_computed_independently():
    """With the true posterior mean and variance every KL term vanishes, so the bound is
    the prior KL plus the decoder term, both written out here by hand."""
    schedule = NoiseSchedule.linear(50, 1e-4, 0.2)
    x0 = _image()
    config, sample = DiffusionConfig(timesteps=50), SampleConfig(variance="beta_tilde", clip_x0=False)
    result = bits_per_dim(Oracle(x0, schedule), schedule, x0, config, sample, progress=False)

    betas = torch.linspace(1e-4, 0.2, 50, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    dims = x0.numel()
    prior = sum(
        0.5 * (-math.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * v**2 - 1) for v in x0.double().flatten().tolist()
    ) / (dims * math.log(2))
    # the decoder's variance at t = 1 is beta_tilde_2 (beta_tilde_1 is 0)
    std = math.sqrt(betas[1] * (1 - ab[0]) / (1 - ab[1]))
    decoder = -sum(_log_bin_probability(v, v, std) for v in x0.flatten().tolist()) / (dims * math.log(2))
    assert result.kl.abs().item() < 1e-4
    assert result.prior.item() == pytest.approx(float(prior), rel=1e-4)
    assert result.decoder.item() == pytest.approx(decoder, rel=1e-4)
    assert result.total.item() == pytest.approx(float(prior) + decoder, rel=1e-4)


def test_oracle_beats_a_network_that_predicts_no_noise():
    schedule = NoiseSchedule.linear(30, 1e-3, 0.3)
    x0 = _image(1)
    config = DiffusionConfig(timesteps=30)
    oracle = bits_per_dim(Oracle(x0, schedule), schedule, x0, config, progress=False).total
    zero = bits_per_dim(Zero(), schedule, x0, config, progress=False).total
    assert oracle.item() < zero.item()


def test_monte_carlo_estimate_agrees_with_the_exact_sum():
    """Averaged over many noise draws (rows repeating one image), K random t per image
    estimate the same KL sum as all T terms."""
    schedule = NoiseSchedule.linear(12, 1e-3, 0.3)
    x0 = _image(2).repeat(400, 1, 1, 1)
    config, sample = DiffusionConfig(timesteps=12), SampleConfig(clip_x0=False)
    exact = bits_per_dim(Zero(), schedule, x0, config, sample, batch_size=400, progress=False)
    estimate = bits_per_dim(Zero(), schedule, x0, config, sample, timesteps=40, batch_size=400, seed=1, progress=False)
    assert exact.monte_carlo_steps is None and estimate.monte_carlo_steps == 40
    assert estimate.decoder.mean().item() == pytest.approx(exact.decoder.mean().item(), rel=0.01)
    assert estimate.kl.mean().item() == pytest.approx(exact.kl.mean().item(), rel=0.02)


def test_result_is_per_image_and_independent_of_batch_size():
    schedule = NoiseSchedule.linear(10, 1e-3, 0.3)
    x0 = torch.cat([_image(i) for i in range(5)])
    config = DiffusionConfig(timesteps=10)
    whole = bits_per_dim(Oracle(x0[:1], schedule), schedule, x0[:1], config, progress=False)
    assert whole.total.shape == (1,)
    a = bits_per_dim(Zero(), schedule, x0, config, batch_size=5, progress=False)
    b = bits_per_dim(Zero(), schedule, x0, config, batch_size=2, progress=False)
    assert a.total.shape == (5,)
    # different noise draws per batch layout, but every term is finite and close
    assert torch.isfinite(b.total).all() and torch.allclose(a.prior, b.prior)
    assert a.summary()["images"] == 5 and a.summary()["kl_timesteps"] == "all"


def test_learned_variance_output_is_used():
    schedule = NoiseSchedule.linear(10, 1e-3, 0.3)
    x0 = _image(4)

    class Learned(torch.nn.Module):
        def __init__(self, v):
            super().__init__()
            self.v = v

        def forward(self, x_t, t):
            return torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, self.v)], dim=1)

    config = DiffusionConfig(timesteps=10, learn_variance=True)
    large = bits_per_dim(Learned(1.0), schedule, x0, config, progress=False).total
    fixed = bits_per_dim(Zero(), schedule, x0, DiffusionConfig(timesteps=10), SampleConfig(variance="beta"), progress=False)
    small = bits_per_dim(Learned(-1.0), schedule, x0, config, progress=False).total
    # v = 1 is sigma^2 = beta: the same bound as the fixed-beta model
    assert large.item() == pytest.approx(fixed.total.item(), rel=1e-4)
    assert small.item() != pytest.approx(large.item(), rel=1e-3)


def test_bad_timesteps_raise():
    schedule = NoiseSchedule.linear(5)
    with pytest.raises(ValueError, match="timesteps"):
        bits_per_dim(Zero(), schedule, _image(), DiffusionConfig(timesteps=5), timesteps=0, progress=False)
