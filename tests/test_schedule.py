import math

import pytest
import torch

from ddpm_cars.config import DiffusionConfig, RunConfig, SampleConfig
from ddpm_cars.diffusion import q_sample
from ddpm_cars.schedule import (
    SIGMA_MAX,
    NoiseSchedule,
    build_schedule,
    cosine_betas,
    linear_betas,
    sampling_timesteps,
    sigmas,
    visited_timesteps,
    zero_terminal_snr,
)


def test_linear_betas_endpoints_and_spacing():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_linear_betas_at_1000_steps_are_the_papers_exactly():
    assert torch.equal(linear_betas(1000), torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    assert torch.equal(NoiseSchedule.linear(1000).betas_float64, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))


@pytest.mark.parametrize("T", [50, 100, 250])
def test_linear_schedule_ends_in_noise_whatever_the_number_of_steps(T):
    """beta_start and beta_end are scaled by 1000 / T (improved-diffusion's "linear"), so
    x_T is still close to N(0, I) with fewer steps."""
    betas = linear_betas(T)
    scale = 1000 / T
    assert torch.allclose(betas, torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64), rtol=1e-12, atol=0)
    alphabar_T = math.prod(1 - b for b in betas.tolist())
    assert alphabar_T < 1e-3
    assert NoiseSchedule.linear(T).alphas_cumprod[-1].item() < 1e-3


def test_scaled_linear_betas_are_capped_below_one():
    betas = linear_betas(10)  # 0.02 * 100 = 2 would pass 1
    expected = torch.linspace(1e-4 * 100, 0.02 * 100, 10, dtype=torch.float64).clamp(max=0.999)
    assert torch.allclose(betas, expected, rtol=1e-12, atol=0)
    assert betas.max().item() == 0.999 and (betas < 1).all()


def test_values_at_known_t():
    s = NoiseSchedule.linear(1000)
    beta_2 = 1e-4 + (0.02 - 1e-4) / 999
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, rel=1e-7)
    assert s.alphas_cumprod[1].item() == pytest.approx((1 - 1e-4) * (1 - beta_2), rel=1e-7)
    # alphabar_T = prod(1 - beta) ~ exp(-sum beta) ~ 4e-5: x_T is essentially pure noise
    expected = math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(1000))
    assert s.alphas_cumprod[-1].item() == pytest.approx(expected, rel=1e-5)
    assert s.alphas_cumprod_prev[0].item() == 1.0
    assert s.posterior_variance[0].item() == 0.0  # beta_tilde_1 = 0


def test_closed_form_matches_applying_the_one_step_kernel_t_times():
    s = NoiseSchedule.linear(100)
    betas = linear_betas(100)
    mean_coef, var = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    for t in range(100):  # x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps, composed
        mean_coef = mean_coef * (1 - betas[t]).sqrt()
        var = (1 - betas[t]) * var + betas[t]
        assert s.sqrt_alphas_cumprod[t].item() == pytest.approx(mean_coef.item(), rel=1e-6)
        assert s.sqrt_one_minus_alphas_cumprod[t].item() == pytest.approx(var.sqrt().item(), rel=1e-6)


def test_closed_form_matches_iterated_kernel_in_distribution():
    s = NoiseSchedule.linear(200)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000,), 0.7)
    x = x0.clone()
    for t in range(150):
        x = (1 - s.betas[t]).sqrt() * x + s.betas[t].sqrt() * torch.randn(x.shape, generator=g)
    closed = q_sample(s, x0, torch.full((20000,), 149), torch.randn(x.shape, generator=g))
    assert x.mean().item() == pytest.approx(closed.mean().item(), abs=0.03)
    assert x.std().item() == pytest.approx(closed.std().item(), rel=0.03)


def test_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x_0) from prior N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}) times likelihood."""
    s = NoiseSchedule.linear(1000)
    betas = linear_betas(1000)
    ab = torch.cumprod(1 - betas, 0)
    for t in [1, 10, 500, 999]:
        prior_var, lik_var, alpha = 1 - ab[t - 1], betas[t], 1 - betas[t]
        post_var = 1 / (1 / prior_var + alpha / lik_var)
        coef_x0 = post_var * ab[t - 1].sqrt() / prior_var
        coef_xt = post_var * alpha.sqrt() / lik_var
        assert s.posterior_variance[t].item() == pytest.approx(post_var.item(), rel=1e-5)
        assert s.posterior_mean_coef1[t].item() == pytest.approx(coef_x0.item(), rel=1e-5)
        assert s.posterior_mean_coef2[t].item() == pytest.approx(coef_xt.item(), rel=1e-5)


def test_fixed_large_variance_uses_beta_tilde_at_the_decoder():
    """log sigma^2 for variance "beta": log beta_t, except at t = 0 (the decoder), where it is
    log beta_tilde of step 1 = log(beta_1 (1 - alphabar_0) / (1 - alphabar_1)) (0-indexed),
    as Ho et al.'s and improved-diffusion's code do."""
    betas = linear_betas(50)
    ab = torch.cumprod(1 - betas, 0)
    s = NoiseSchedule.linear(50)
    beta_tilde_1 = betas[1] * (1 - ab[0]) / (1 - ab[1])
    assert s.beta_log_variance[0].item() == pytest.approx(beta_tilde_1.log().item(), rel=1e-6)
    assert s.beta_log_variance[0] == s.posterior_log_variance_clipped[0]
    assert torch.allclose(s.beta_log_variance[1:].double(), betas[1:].log(), rtol=1e-6)


def test_everything_stored_as_float32_but_the_defining_betas():
    s = NoiseSchedule.linear(10)
    for name, value in vars(s).items():
        assert value.dtype == (torch.float64 if name == "betas_float64" else torch.float32), name
        assert value.shape == (10,), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_q_sample_follows_input_dtype(dtype):
    s = NoiseSchedule.linear(50)
    x0 = torch.rand(3, 3, 4, 4, dtype=dtype)
    out = q_sample(s, x0, torch.tensor([0, 10, 49]), torch.randn_like(x0))
    assert out.dtype == dtype and out.shape == x0.shape


def test_gather_broadcasts_per_batch_element():
    s = NoiseSchedule.linear(10)
    like = torch.zeros(3, 2, 5, 5)
    got = s.gather(s.betas, torch.tensor([0, 4, 9]), like)
    assert got.shape == (3, 1, 1, 1)
    assert torch.equal(got.flatten(), s.betas[[0, 4, 9]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_q_sample_follows_input_device():
    s = NoiseSchedule.linear(50)
    x0 = torch.rand(2, 3, 4, 4, device="cuda")
    assert q_sample(s, x0, torch.tensor([1, 2]), torch.randn_like(x0)).device == x0.device


@pytest.mark.parametrize("kwargs", [dict(timesteps=0), dict(beta_start=0.0), dict(beta_start=0.1, beta_end=0.01)])
def test_bad_schedules_raise(kwargs):
    with pytest.raises(ValueError):
        build_schedule(DiffusionConfig(**kwargs))


def _cosine_alphabar(t: float, T: int, s: float = 0.008) -> float:
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t) / f(0)


def test_cosine_alphabar_follows_eq_17_of_nichol_and_dhariwal():
    T = 1000
    s = build_schedule(DiffusionConfig(timesteps=T, schedule="cosine"))
    for t in [1, 2, 10, 250, 500, 900, 990]:  # paper's 1-indexed t is index t - 1 here
        assert s.alphas_cumprod[t - 1].item() == pytest.approx(_cosine_alphabar(t, T), rel=1e-5)


def test_cosine_betas_are_clipped_and_increasing():
    betas = cosine_betas(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas.max().item() == pytest.approx(0.999)  # clipped at the very end
    assert (betas > 0).all() and (betas.diff() >= 0).all()
    assert betas[0].item() == pytest.approx(1 - _cosine_alphabar(1, 1000), rel=1e-6)


def test_cosine_keeps_more_signal_than_linear_midway():
    """The point of the cosine schedule: information is destroyed more slowly (Fig. 5 of the paper)."""
    linear = build_schedule(DiffusionConfig(timesteps=1000))
    cosine = build_schedule(DiffusionConfig(timesteps=1000, schedule="cosine"))
    assert cosine.alphas_cumprod[499] > 2 * linear.alphas_cumprod[499]
    assert cosine.alphas_cumprod[-1] < 1e-4  # and still ends in noise


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="diffusion.schedule"):
        DiffusionConfig(schedule="quadratic")


@pytest.mark.parametrize("timesteps", [10, 37, 1000])
@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
def test_sampling_timesteps_run_from_the_last_step_to_zero(timesteps, spacing):
    for steps in [2, 3, 7, 9, timesteps // 3, timesteps // 2 - 1, timesteps]:
        ts = sampling_timesteps(timesteps, steps, spacing).tolist()
        assert len(ts) == steps and ts[0] == 0 and ts[-1] == timesteps - 1, (steps, ts)
        assert all(b > a for a, b in zip(ts, ts[1:])), (steps, ts)
    assert sampling_timesteps(timesteps, 1).tolist() == [timesteps - 1]
    assert sampling_timesteps(timesteps, None).tolist() == list(range(timesteps))


def test_quadratic_spacing_is_denser_near_zero_and_errors_are_clear():
    ts = sampling_timesteps(1000, 10, "quadratic").tolist()
    assert ts == [round((i / 9) ** 2 * 999) for i in range(10)]
    # bad requests are refused where they enter, in the config, with a clear message ...
    with pytest.raises(ValueError, match="cannot exceed the 10"):
        RunConfig(diffusion=DiffusionConfig(timesteps=10), sample=SampleConfig(steps=11))
    with pytest.raises(ValueError, match="sample.spacing"):
        SampleConfig(spacing="cubic")
    # ... so inside the library they are invariants
    with pytest.raises(AssertionError):
        sampling_timesteps(10, 11)
    with pytest.raises(AssertionError):
        sampling_timesteps(10, 3, "cubic")


# -- spacing by noise level ---------------------------------------------------------------


def _log_sigma(schedule: NoiseSchedule) -> torch.Tensor:
    ab = torch.cumprod(1 - schedule.betas_float64, 0)
    return 0.5 * (torch.log1p(-ab) - torch.log(ab))  # log sqrt((1 - ab) / ab), written out


@pytest.mark.parametrize("sigma_max", [SIGMA_MAX, 10.0, 1e6])
@pytest.mark.parametrize("spacing", ["karras", "logsnr"])
@pytest.mark.parametrize(
    "schedule",
    [
        NoiseSchedule.from_betas(cosine_betas(1000)),
        NoiseSchedule.linear(1000),
        NoiseSchedule.linear(10),
        NoiseSchedule.from_betas(cosine_betas(37)),
    ],
)
def test_noise_level_spacing_runs_from_sigma_max_to_zero(spacing, schedule, sigma_max):
    T, log_sigma = schedule.timesteps, _log_sigma(schedule)
    # the start: the trained step nearest sigma_max, or T - 1 when the schedule stays below it
    start = int((log_sigma - math.log(sigma_max)).abs().argmin()) if log_sigma[-1] > math.log(sigma_max) else T - 1
    ab = schedule.alphas_cumprod_float64
    for steps in sorted({2, 3, min(7, start + 1), min(20, start + 1), start + 1}):
        ts = sampling_timesteps(T, steps, spacing, ab, sigma_max).tolist()
        assert len(ts) == steps and ts[0] == 0 and ts[-1] == start, (steps, ts)
        assert all(b > a for a, b in zip(ts, ts[1:])), (steps, ts)
    assert sampling_timesteps(T, 1, spacing, ab, sigma_max).tolist() == [start]
    if start < T - 2:  # more steps than lie below sigma_max: the spacing starts higher, at step `steps - 1`
        ts = sampling_timesteps(T, start + 3, spacing, ab, sigma_max).tolist()
        assert ts == list(range(start + 3))
    if sigma_max == SIGMA_MAX:  # the default
        assert torch.equal(sampling_timesteps(T, 3, spacing, ab), sampling_timesteps(T, 3, spacing, ab, sigma_max))


def test_a_sample_config_names_the_steps_it_visits():
    """visited_timesteps reads steps, spacing and the starting sigma from the sampling settings;
    the starting sigma moves only the noise-level spacings."""
    schedule = NoiseSchedule.from_betas(cosine_betas(1000))
    ab = schedule.alphas_cumprod_float64
    for spacing in ["uniform", "quadratic", "karras", "logsnr"]:
        for sigma_max in [SIGMA_MAX, 3.0]:
            sample = SampleConfig(steps=12, spacing=spacing, sigma_max=sigma_max)
            expected = sampling_timesteps(1000, 12, spacing, ab, sigma_max)
            assert torch.equal(visited_timesteps(schedule, sample), expected)
        moved = not torch.equal(
            visited_timesteps(schedule, SampleConfig(steps=12, spacing=spacing, sigma_max=3.0)),
            visited_timesteps(schedule, SampleConfig(steps=12, spacing=spacing)),
        )
        assert moved == (spacing in ("karras", "logsnr")), spacing
    start = int(visited_timesteps(schedule, SampleConfig(steps=12, spacing="karras", sigma_max=3.0))[-1])
    assert 2.5 < sigmas(ab)[start] < 3.5
    assert torch.equal(visited_timesteps(schedule, SampleConfig()), torch.arange(1000))


def test_the_cosine_schedule_starts_at_sigma_80_not_at_its_clipped_last_step():
    ab = NoiseSchedule.from_betas(cosine_betas(1000)).alphas_cumprod_float64
    assert sigmas(ab)[-1] > 1e4  # the clipped last beta: x_0 estimates of an eps model blow up there
    ts = sampling_timesteps(1000, 20, "karras", ab)
    assert 75 < sigmas(ab)[ts[-1]] < 85 and ts[-1] < 995


@pytest.mark.parametrize("spacing", ["karras", "logsnr"])
def test_noise_level_spacing_takes_the_trained_step_nearest_each_level(spacing):
    """Karras et al. (2022, Eq. 5): sigma_i = (sigma_min^(1/7) + i/(n-1) (sigma_max^(1/7) -
    sigma_min^(1/7)))^7; logsnr: log sigma_i even between the two ends."""
    schedule = NoiseSchedule.from_betas(cosine_betas(1000))
    ab, log_sigma = schedule.alphas_cumprod_float64, _log_sigma(schedule)
    n = 8
    ts = sampling_timesteps(1000, n, spacing, ab)
    lo, hi = log_sigma[0].exp(), log_sigma[ts[-1]].exp()
    for i, t in enumerate(ts.tolist()):
        if spacing == "karras":
            level = (lo ** (1 / 7) + i / (n - 1) * (hi ** (1 / 7) - lo ** (1 / 7))) ** 7
        else:
            level = (lo.log() + i / (n - 1) * (hi.log() - lo.log())).exp()
        assert t == int((log_sigma - level.log()).abs().argmin()), (i, t)
    with pytest.raises(AssertionError, match="needs the schedule"):
        sampling_timesteps(1000, n, spacing)


def test_respacing_keeps_alphabar_at_the_kept_steps():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    ts = torch.tensor([0, 3, 250, 999])
    respaced = NoiseSchedule.from_betas(betas).respace(ts)
    assert respaced.timesteps == 4
    assert torch.allclose(respaced.alphas_cumprod.double(), ab[ts], rtol=1e-6)
    expected_betas = 1 - ab[ts] / torch.cat([torch.ones(1, dtype=torch.float64), ab[ts][:-1]])
    assert torch.allclose(respaced.betas_float64, expected_betas, rtol=1e-12)


def test_respacing_onto_every_step_changes_nothing():
    full = NoiseSchedule.from_betas(cosine_betas(200))
    same = full.respace(torch.arange(200))
    assert torch.allclose(same.betas_float64, full.betas_float64, rtol=1e-9, atol=1e-15)
    assert torch.allclose(same.posterior_mean_coef1, full.posterior_mean_coef1, rtol=1e-6)


def test_respacing_rejects_a_bad_subsequence():
    full = NoiseSchedule.linear(10)
    for bad in ([3, 3, 9], [5, 2], [0, 10], []):
        with pytest.raises(ValueError, match="increasing subsequence"):
            full.respace(torch.tensor(bad, dtype=torch.long))


# -- zero terminal SNR ---------------------------------------------------------------------


@pytest.mark.parametrize("betas", [linear_betas(1000), cosine_betas(1000), cosine_betas(50)])
def test_zero_terminal_snr_ends_at_alphabar_0_and_keeps_the_first_step(betas):
    """Lin et al. (2024), Algorithm 1: sqrt(alphabar) moved by an affine map that sends the
    last value to 0 and keeps the first."""
    new = zero_terminal_snr(betas)
    root, new_root = torch.cumprod(1 - betas, 0).sqrt(), torch.cumprod(1 - new, 0).sqrt()
    assert new[-1] == 1.0 and new_root[-1] == 0.0 and torch.isclose(new_root[0], root[0], rtol=1e-12)
    slope = (root[0] - 0.0) / (root[0] - root[-1])  # new_root = slope * (root - root[-1])
    assert torch.allclose(new_root, slope * (root - root[-1]), rtol=1e-9, atol=1e-15)
    assert ((new > 0) & (new <= 1)).all()


def test_zero_terminal_snr_is_a_training_option_that_needs_v_or_x0():
    schedule = build_schedule(DiffusionConfig(schedule="cosine", prediction="v", zero_terminal_snr=True))
    assert schedule.alphas_cumprod_float64[-1] == 0 and torch.isfinite(schedule.posterior_log_variance_clipped).all()
    assert torch.isfinite(schedule.posterior_mean_coef1).all() and torch.isfinite(schedule.beta_log_variance).all()
    with pytest.raises(ValueError, match="needs --prediction v or x0"):
        DiffusionConfig(prediction="eps", zero_terminal_snr=True)
