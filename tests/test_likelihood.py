import dataclasses
import math

import pytest
import torch

from ddpm_cars.cli import build_parser
from ddpm_cars.config import DiffusionConfig, SampleConfig
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.evaluation import bits_per_dim
from ddpm_cars.schedule import NoiseSchedule, build_schedule


def _linear(timesteps: int, beta_start: float, beta_end: float) -> NoiseSchedule:
    """Betas exactly linspace(beta_start, beta_end, T) (NoiseSchedule.linear scales them by 1000 / T)."""
    return NoiseSchedule.from_betas(torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64))


def _denoiser(network: torch.nn.Module, schedule: NoiseSchedule, **config) -> Denoiser:
    return Denoiser(network, schedule, DiffusionConfig(timesteps=schedule.timesteps, **config), image_size=4)


def _with_log_beta_0_at_the_decoder(schedule: NoiseSchedule) -> NoiseSchedule:
    """The schedule as it was before the decoder used beta_tilde: fixed "beta" is log beta_t at every t."""
    log_beta_0 = schedule.betas_float64[:1].log().float()
    return dataclasses.replace(schedule, beta_log_variance=torch.cat([log_beta_0, schedule.beta_log_variance[1:]]))


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
    schedule = _linear(50, 1e-4, 0.2)
    x0 = _image()
    sample = SampleConfig(variance="beta_tilde", clip_x0=False)
    result = bits_per_dim(_denoiser(Oracle(x0, schedule), schedule), x0, sample, progress=False)

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
    schedule = _linear(30, 1e-3, 0.3)
    x0 = _image(1)
    oracle = bits_per_dim(_denoiser(Oracle(x0, schedule), schedule), x0, progress=False).total
    zero = bits_per_dim(_denoiser(Zero(), schedule), x0, progress=False).total
    assert oracle.item() < zero.item()


def test_monte_carlo_estimate_agrees_with_the_exact_sum():
    """Averaged over many noise draws (rows repeating one image), K random t per image
    estimate the same KL sum as all T terms."""
    schedule = _linear(12, 1e-3, 0.3)
    x0 = _image(2).repeat(400, 1, 1, 1)
    zero, sample = _denoiser(Zero(), schedule), SampleConfig(clip_x0=False)
    exact = bits_per_dim(zero, x0, sample, batch_size=400, progress=False)
    estimate = bits_per_dim(zero, x0, sample, timesteps=40, batch_size=400, seed=1, progress=False)
    assert exact.monte_carlo_steps is None and estimate.monte_carlo_steps == 40
    assert estimate.decoder.mean().item() == pytest.approx(exact.decoder.mean().item(), rel=0.01)
    assert estimate.kl.mean().item() == pytest.approx(exact.kl.mean().item(), rel=0.02)


def test_result_is_per_image_and_independent_of_batch_size():
    schedule = _linear(10, 1e-3, 0.3)
    x0 = torch.cat([_image(i) for i in range(5)])
    whole = bits_per_dim(_denoiser(Oracle(x0[:1], schedule), schedule), x0[:1], progress=False)
    assert whole.total.shape == (1,)
    a = bits_per_dim(_denoiser(Zero(), schedule), x0, batch_size=5, progress=False)
    b = bits_per_dim(_denoiser(Zero(), schedule), x0, batch_size=2, progress=False)
    assert a.total.shape == (5,)
    # different noise draws per batch layout, but every term is finite and close
    assert torch.isfinite(b.total).all() and torch.allclose(a.prior, b.prior)
    assert a.summary()["images"] == 5 and a.summary()["kl_timesteps"] == "all"


def test_learned_variance_output_is_used():
    schedule = _linear(10, 1e-3, 0.3)
    x0 = _image(4)

    class Learned(torch.nn.Module):
        def __init__(self, v):
            super().__init__()
            self.v = v

        def forward(self, x_t, t):
            return torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, self.v)], dim=1)

    large = bits_per_dim(_denoiser(Learned(1.0), schedule, learn_variance=True), x0, progress=False)
    beta = SampleConfig(variance="beta")
    fixed = bits_per_dim(_denoiser(Zero(), schedule), x0, beta, progress=False)
    small = bits_per_dim(_denoiser(Learned(-1.0), schedule, learn_variance=True), x0, progress=False).total
    # v = 1 is sigma^2 = beta_t at every t (Eq. 15), the decoder's beta_0 (0-indexed) included:
    # the same bound as a fixed sigma^2 = beta_t model. The fixed "beta" choice itself takes
    # beta_tilde of step 1 at the decoder, so it agrees with v = 1 on every term but L_0
    beta_everywhere = bits_per_dim(
        _denoiser(Zero(), _with_log_beta_0_at_the_decoder(schedule)), x0, beta, progress=False
    )
    assert large.total.item() == pytest.approx(beta_everywhere.total.item(), rel=1e-4)
    assert large.kl.item() == pytest.approx(fixed.kl.item(), rel=1e-4)
    assert large.prior.item() == pytest.approx(fixed.prior.item(), rel=1e-4)
    assert small.item() != pytest.approx(large.total.item(), rel=1e-3)


def test_bad_timesteps_raise():
    # refused where the user gives it (eval --timesteps) ...
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--checkpoint", "run", "--nll", "--timesteps", "0"])
    # ... and an invariant inside the library
    schedule = NoiseSchedule.linear(5)
    with pytest.raises(AssertionError):
        bits_per_dim(_denoiser(Zero(), schedule), _image(), timesteps=0, progress=False)


class OffsetOracle(torch.nn.Module):
    """Knows the one image x0 and predicts the noise that puts x0_pred at x0 + offset, so the
    decoder's mean at t = 0 is x0 + offset whatever the noise (one parameter: the offset)."""

    def __init__(self, x0: torch.Tensor, schedule: NoiseSchedule, offset: float):
        super().__init__()
        self.x0, self.schedule = x0, schedule
        self.offset = torch.nn.Parameter(torch.tensor(offset))

    def forward(self, x_t, t):
        ab = self.schedule.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        x0_pred = self.x0.double() + self.offset.double()
        return ((x_t.double() - ab.sqrt() * x0_pred) / (1 - ab).sqrt()).float()


def _decoder_bits(x0: torch.Tensor, mean: torch.Tensor, std: float) -> float:
    """-log2 P(x0 | x_1) per dimension under the discretised Gaussian (Eq. 13, Ho et al. 2020)."""
    logs = [_log_bin_probability(v, m, std) for v, m in zip(x0.flatten().tolist(), mean.flatten().tolist())]
    return -sum(logs) / (x0.numel() * math.log(2))


def test_fixed_variance_decoder_uses_beta_tilde_of_step_1():
    """A fixed sigma^2 = beta_t model's decoder term L_0 uses log beta_tilde of step 1 =
    log(beta_1 (1 - alphabar_0) / (1 - alphabar_1)) (0-indexed) as Ho et al.'s and
    improved-diffusion's code do, not log beta_0; the total bound moves by exactly the
    difference of the two decoder terms, both written out here by hand."""
    T = 50
    schedule = build_schedule(DiffusionConfig(timesteps=T))  # the linear schedule, scaled by 1000 / T
    x0 = _image(5)
    offset = 0.004  # the decoder's mean is off by about one level
    model = OffsetOracle(x0, schedule, offset)
    sample = SampleConfig(variance="beta", clip_x0=False)
    new = bits_per_dim(_denoiser(model, schedule), x0, sample, progress=False)
    old = bits_per_dim(_denoiser(model, _with_log_beta_0_at_the_decoder(schedule)), x0, sample, progress=False)

    betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    beta_tilde_1 = (betas[1] * (1 - ab[0]) / (1 - ab[1])).item()
    decoder_new = _decoder_bits(x0, x0 + offset, math.sqrt(beta_tilde_1))
    decoder_old = _decoder_bits(x0, x0 + offset, math.sqrt(betas[0].item()))
    assert beta_tilde_1 < betas[0].item() and decoder_new != pytest.approx(decoder_old, rel=1e-2)
    assert new.decoder.item() == pytest.approx(decoder_new, rel=1e-4)
    assert old.decoder.item() == pytest.approx(decoder_old, rel=1e-4)
    # only L_0 changed: the same noise, the same KL terms and prior
    assert torch.equal(new.kl, old.kl) and torch.equal(new.prior, old.prior)
    assert new.total.item() - old.total.item() == pytest.approx(decoder_new - decoder_old, rel=1e-4)
    assert new.total.item() < old.total.item()  # a narrower decoder around a mean one level off


def test_oracle_bound_of_a_grayscale_image_averages_over_its_one_channel():
    """Bits per dimension of a [1, 1, 4, 4] image: the prior and decoder terms written out by
    hand over its 16 dimensions; the same image repeated to three channels has the same
    bits per dimension (three copies of every term, three times the dimensions)."""
    schedule = _linear(20, 1e-4, 0.2)
    x0 = _image(6)[:, :1]
    sample = SampleConfig(variance="beta_tilde", clip_x0=False)
    gray = bits_per_dim(_denoiser(Oracle(x0, schedule), schedule), x0, sample, progress=False)

    betas = torch.linspace(1e-4, 0.2, 20, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    values = x0.double().flatten().tolist()
    assert len(values) == 16
    prior = sum(0.5 * (-math.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * v**2 - 1) for v in values) / (16 * math.log(2))
    std = math.sqrt(betas[1] * (1 - ab[0]) / (1 - ab[1]))
    decoder = -sum(_log_bin_probability(v, v, std) for v in x0.flatten().tolist()) / (16 * math.log(2))
    assert gray.kl.abs().item() < 1e-4
    assert gray.prior.item() == pytest.approx(float(prior), rel=1e-4)
    assert gray.decoder.item() == pytest.approx(decoder, rel=1e-4)

    rgb_x0 = x0.repeat(1, 3, 1, 1)
    rgb = bits_per_dim(_denoiser(Oracle(rgb_x0, schedule), schedule), rgb_x0, sample, progress=False)
    assert rgb.total.item() == pytest.approx(gray.total.item(), rel=1e-4)
