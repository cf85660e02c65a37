import pytest
import torch

from ddpm_cars.config import SampleConfig
from ddpm_cars.models import SimpleUnet
from ddpm_cars.samplers import ancestral_sample, generate, image_generators, randn
from ddpm_cars.schedule import NoiseSchedule


class Shrink(torch.nn.Module):
    """A stand-in network: eps_theta(x_t, t) = 0.3 x_t + 0.001 t."""

    def forward(self, x, t, y=None):
        return 0.3 * x + 0.001 * t.view(-1, 1, 1, 1).float()


def algorithm_2(schedule, x_T, generators, variance):
    """Ho et al. (2020) Algorithm 2, written out independently, one image at a time."""
    betas = schedule.betas.double()
    alphas = 1 - betas
    ab = torch.cumprod(alphas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    out = []
    for i, g in enumerate(generators):
        x = x_T[i].double()
        for t in reversed(range(schedule.timesteps)):
            eps = 0.3 * x + 0.001 * t
            z = torch.randn(x.shape, generator=g).double()  # drawn at every step, used when t > 1
            sigma2 = betas[t] if variance == "beta" else betas[t] * (1 - ab_prev[t]) / (1 - ab[t])
            mean = (x - betas[t] / (1 - ab[t]).sqrt() * eps) / alphas[t].sqrt()
            x = mean + (sigma2.sqrt() * z if t > 0 else 0)
        out.append(x.float())
    return torch.stack(out)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ancestral_sampling_is_algorithm_2(variance):
    schedule = NoiseSchedule.linear(25)
    x_T = randn((3, 4, 4), image_generators(1, range(3)), "cpu")
    got = ancestral_sample(Shrink(), schedule, x_T, image_generators(7, range(3)), variance=variance, clip_x0=False)
    expected = algorithm_2(schedule, x_T, image_generators(7, range(3)), variance)
    assert torch.allclose(got, expected, atol=1e-4)


def test_last_step_adds_no_noise():
    schedule = NoiseSchedule.linear(1)  # a single step, t = 1: the output is the mean
    x_T = torch.randn(2, 3, 4, 4)
    a = ancestral_sample(Shrink(), schedule, x_T, image_generators(0, range(2)), clip_x0=False)
    b = ancestral_sample(Shrink(), schedule, x_T, image_generators(99, range(2)), clip_x0=False)
    assert torch.equal(a, b)


def test_clipping_x0_changes_nothing_when_prediction_is_in_range():
    schedule = NoiseSchedule.linear(10)
    x_T = 0.01 * torch.randn(2, 3, 4, 4)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731 -- x0_pred = x_t / sqrt(ab) stays small
    a = ancestral_sample(zero, schedule, x_T, image_generators(0, range(2)), variance="beta_tilde", clip_x0=True)
    b = ancestral_sample(zero, schedule, x_T, image_generators(0, range(2)), variance="beta_tilde", clip_x0=False)
    assert torch.allclose(a, b, atol=1e-5)


def test_clipping_x0_bounds_the_prediction():
    schedule = NoiseSchedule.linear(10)
    seen = []
    wild = lambda x, t: -50 * torch.ones_like(x)  # noqa: E731 -- predicts x0 far outside [-1, 1]
    ancestral_sample(wild, schedule, torch.randn(2, 3, 4, 4), image_generators(0, range(2)),
                     callback=lambda t, x, x0: seen.append(x0.abs().max().item()))
    assert len(seen) == 10 and max(seen) <= 1.0


def test_clipped_x0_is_what_the_mean_is_built_from():
    """With T = 1 the only step returns the posterior mean at t = 1, which is x0 itself."""
    schedule = NoiseSchedule.linear(1)
    x_T = torch.randn(2, 3, 4, 4)
    wild = lambda x, t: -50 * torch.ones_like(x)  # noqa: E731
    expected = (x_T + 50 * schedule.betas[0].sqrt()) / (1 - schedule.betas[0]).sqrt()  # Eq. 4 inverted
    assert (expected.abs() > 1).any() and (expected.abs() < 1).any()
    raw = ancestral_sample(wild, schedule, x_T, image_generators(0, range(2)), clip_x0=False)
    assert torch.allclose(raw, expected, atol=1e-4)
    clipped = ancestral_sample(wild, schedule, x_T, image_generators(0, range(2)), clip_x0=True)
    assert torch.allclose(clipped, expected.clamp(-1, 1), atol=1e-4)


def test_callback_sees_every_step_in_order():
    steps = []
    ancestral_sample(Shrink(), NoiseSchedule.linear(6), torch.randn(1, 3, 4, 4), image_generators(0, [0]),
                     callback=lambda t, x, x0: steps.append(t))
    assert steps == [5, 4, 3, 2, 1, 0]


def test_generator_count_must_match_batch():
    with pytest.raises(ValueError, match="one generator per image"):
        ancestral_sample(Shrink(), NoiseSchedule.linear(3), torch.randn(2, 3, 4, 4), image_generators(0, [0]))


@pytest.fixture
def small_unet():
    torch.manual_seed(0)
    model = SimpleUnet(channels=(8, 16), time_emb_dim=8)
    model.train()
    model(torch.randn(8, 3, 16, 16), torch.randint(0, 20, (8,)))  # give BatchNorm running stats
    return model


def test_same_seed_same_images_and_batch_size_does_not_matter(small_unet):
    schedule, cfg = NoiseSchedule.linear(20), SampleConfig(batchnorm="eval")
    a = generate(small_unet, schedule, 5, 16, seed=3, config=cfg, batch_size=5, progress=False)
    b = generate(small_unet, schedule, 5, 16, seed=3, config=cfg, batch_size=2, progress=False)
    c = generate(small_unet, schedule, 5, 16, seed=4, config=cfg, batch_size=5, progress=False)
    assert a.shape == (5, 3, 16, 16)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert small_unet.training  # mode restored


def test_batch_statistics_mode_depends_on_the_batch(small_unet):
    schedule = NoiseSchedule.linear(20)
    state = {k: v.clone() for k, v in small_unet.state_dict().items()}
    cfg = SampleConfig(batchnorm="batch")
    a = generate(small_unet, schedule, 4, 16, seed=0, config=cfg, batch_size=4, progress=False)
    b = generate(small_unet, schedule, 4, 16, seed=0, config=cfg, batch_size=2, progress=False)
    assert not torch.allclose(a, b)
    assert all(torch.equal(state[k], v) for k, v in small_unet.state_dict().items())


def test_sampling_uses_the_learned_variance():
    """A 6-channel model: the second half sets sigma^2 to beta (v = 1) or beta_tilde (v = -1),
    which must sample exactly as the 3-channel model with that fixed variance."""
    from ddpm_cars.config import DiffusionConfig

    schedule = NoiseSchedule.linear(5, 1e-3, 0.2)

    class Learned(torch.nn.Module):
        def __init__(self, v):
            super().__init__()
            self.v = v

        def forward(self, x, t):
            return torch.cat([0.3 * x, torch.full_like(x, self.v)], dim=1)

    x_T = torch.randn(2, 3, 4, 4)
    learned = DiffusionConfig(timesteps=5, learn_variance=True)
    for v, variance in [(1.0, "beta"), (-1.0, "beta_tilde")]:
        got = ancestral_sample(Learned(v), schedule, x_T, image_generators(0, range(2)), diffusion_config=learned, clip_x0=False)
        fixed = ancestral_sample(lambda x, t: 0.3 * x, schedule, x_T, image_generators(0, range(2)),
                                 diffusion_config=DiffusionConfig(timesteps=5), variance=variance, clip_x0=False)
        assert got.shape == (2, 3, 4, 4) and torch.allclose(got, fixed, atol=1e-5)
    other = ancestral_sample(Learned(0.0), schedule, x_T, image_generators(0, range(2)), diffusion_config=learned, clip_x0=False)
    assert not torch.allclose(other, got, atol=1e-3)
