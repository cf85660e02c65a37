import pytest
import torch
import torch.nn.functional as F

from ddpm_cars import diffusion
from ddpm_cars.schedule import NoiseSchedule


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


def test_eq_11_mean_equals_posterior_mean_of_predicted_x0(schedule):
    x_t, eps = torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
    t = torch.tensor([1, 2, 50, 600, 999])
    via_x0 = diffusion.posterior_mean(schedule, diffusion.predict_x0_from_eps(schedule, x_t, t, eps), x_t, t)
    assert torch.allclose(diffusion.eps_mean(schedule, x_t, t, eps), via_x0, atol=1e-4)


def test_eps_mean_formula(schedule):
    x_t, eps, t = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.tensor([400])
    beta = 1e-4 + 400 * (0.02 - 1e-4) / 999
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[400].item()
    expected = (x_t - beta / (1 - ab) ** 0.5 * eps) / (1 - beta) ** 0.5
    assert torch.allclose(diffusion.eps_mean(schedule, x_t, t, eps), expected, atol=1e-5)


def test_reverse_std_choices(schedule):
    like, t = torch.zeros(2, 1), torch.tensor([0, 999])
    assert torch.allclose(diffusion.reverse_std(schedule, t, like, "beta").flatten(), schedule.betas[t].sqrt())
    tilde = diffusion.reverse_std(schedule, t, like, "beta_tilde").flatten()
    assert tilde[0] == 0 and torch.allclose(tilde[1], schedule.posterior_variance[999].sqrt())


class Recorder(torch.nn.Module):
    """Returns a fixed function of x_t and remembers its inputs."""

    def forward(self, x, t):
        self.seen = (x.clone(), t.clone())
        return 0.5 * x


@pytest.mark.parametrize("loss_type, fn", [("l1", F.l1_loss), ("l2", F.mse_loss)])
def test_training_loss_compares_predicted_and_true_noise(schedule, loss_type, fn):
    model = Recorder()
    x0, noise, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.tensor([5, 50, 500])
    loss = diffusion.training_loss(model, schedule, x0, t, noise, loss_type)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    assert torch.equal(model.seen[1], t) and torch.allclose(model.seen[0], x_t)
    assert loss.item() == pytest.approx(fn(0.5 * x_t, noise).item(), rel=1e-6)


def test_unknown_loss_raises(schedule):
    with pytest.raises(ValueError, match="l1"):
        diffusion.training_loss(Recorder(), schedule, torch.zeros(1, 3, 4, 4), torch.tensor([1]), torch.zeros(1, 3, 4, 4), "huber")
