"""Progressive distillation's target and loss against a float64 computation from Salimans &
Ho (2022), written out here without the library's helpers, and the trailing step grid."""

import math

import pytest
import torch
from torch import nn

from ddpm_cars.config import DiffusionConfig
from ddpm_cars.denoiser import Denoiser
from ddpm_cars.distillation import FINAL, student_loss, student_steps, teacher_target
from ddpm_cars.schedule import build_schedule, sampling_timesteps, trailing_timesteps


class Affine(nn.Module):
    """A stand-in network whose output is a known function of (x_t, t): a * x_t + b * t / T."""

    def __init__(self, a: float, b: float, timesteps: int, channels: int = 3):
        super().__init__()
        self.a, self.b, self.timesteps, self.channels = a, b, timesteps, channels

    def forward(self, x, t, y=None):
        out = self.a * x + self.b * (t.float() / self.timesteps).view(-1, 1, 1, 1)
        return out if self.channels == x.shape[1] else torch.cat([out, torch.zeros_like(out)], dim=1)


def _hand_x0(prediction: str, out, z, abar):
    """x_0 from a network output in float64, by the parameterisations' definitions, clipped."""
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    if prediction == "eps":
        x0 = (z - sigma * out) / alpha
    elif prediction == "x0":
        x0 = out
    else:  # v = alpha eps - sigma x_0 (Salimans & Ho, Sec. 4), so x_0 = alpha z - sigma v
        x0 = alpha * z - sigma * out
    return x0.clamp(-1, 1)


def _hand_target(prediction, a, b, T, abar_all, z, t, mid, nxt):
    """Eq. 8-10 of Salimans & Ho (Appendix G / Algorithm 2) for one image, float64."""

    def abar(s):
        return torch.tensor(1.0, dtype=torch.float64) if s == FINAL else abar_all[s]

    def ddim(z, s, to):
        out = a * z + b * s / T
        x0 = _hand_x0(prediction, out, z, abar(s))
        eps = (z - abar(s).sqrt() * x0) / (1 - abar(s)).sqrt()
        return abar(to).sqrt() * x0 + (1 - abar(to)).sqrt() * eps

    z_mid = ddim(z, t, mid)
    z_next = ddim(z_mid, mid, nxt)
    a_t, s_t = abar(t).sqrt(), (1 - abar(t)).sqrt()
    a_n, s_n = abar(nxt).sqrt(), (1 - abar(nxt)).sqrt()
    x_tilde = (z_next - s_n / s_t * z) / (a_n - s_n / s_t * a_t)
    # the defining property: one DDIM step from z with x~ lands on the teacher's z''
    assert torch.allclose(a_n * x_tilde + s_n / s_t * (z - a_t * x_tilde), z_next, atol=1e-9)
    return x_tilde


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("learn_variance", [False, True])
def test_teacher_target_matches_a_float64_computation_from_the_paper(prediction, learn_variance):
    T, calls = 100, 4
    config = DiffusionConfig(timesteps=T, schedule="cosine", prediction=prediction, learn_variance=learn_variance)
    schedule = build_schedule(config)
    net = Affine(0.3, -0.2, T, channels=3 if not learn_variance else 6)
    teacher = Denoiser(net, schedule, config, image_size=4)
    steps = student_steps(T, calls)
    z = torch.randn(calls, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.5
    k = torch.arange(calls)  # every student step once, the last ending at x_0
    got = teacher_target(teacher, z, steps, k)
    abar64 = schedule.alphas_cumprod_float64
    for i in range(calls):
        want = _hand_target(
            prediction, 0.3, -0.2, T, abar64, z[i].double(), int(steps.t[i]), int(steps.mid[i]), int(steps.next[i])
        )
        torch.testing.assert_close(got[i].double(), want, rtol=1e-4, atol=1e-4)


def test_the_last_student_step_targets_the_teachers_x0_and_the_first_starts_at_pure_noise():
    steps = student_steps(1000, 4)
    assert steps.t.tolist() == [999, 749, 499, 249]
    assert steps.mid.tolist() == [874, 624, 374, 124]
    assert steps.next.tolist() == [749, 499, 249, FINAL]


@pytest.mark.parametrize("T", [1000, 100, 250])
def test_trailing_steps_for_n_are_every_other_step_for_2n(T):
    for n in (1, 2, 4, 8, 16, 32):
        if 2 * n > T // 2:
            break
        fine, coarse = trailing_timesteps(T, 2 * n).flip(0), trailing_timesteps(T, n).flip(0)
        assert torch.equal(fine[::2], coarse)
        assert fine[0] == T - 1 and torch.all(fine[1:] < fine[:-1])
        steps = student_steps(T, n)
        assert torch.equal(steps.t, coarse) and torch.equal(steps.mid, fine[1::2])


def test_trailing_spacing_is_diffusers_trailing_spacing():
    diffusers = pytest.importorskip("diffusers")
    for T, n in [(1000, 8), (1000, 16), (1000, 3), (100, 8), (1000, 1), (1000, 64)]:
        scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
        scheduler.set_timesteps(n)
        assert sorted(scheduler.timesteps.tolist()) == sampling_timesteps(T, n, "trailing").tolist()


def test_trailing_spacing_by_its_formula():
    # round(1000 - i 62.5) - 1, ties to even as NumPy rounds: 937.5 -> 938 and 812.5 -> 812
    assert trailing_timesteps(1000, 16).tolist() == [
        61, 124, 187, 249, 311, 374, 437, 499, 561, 624, 687, 749, 811, 874, 937, 999
    ]  # fmt: skip


def test_student_loss_is_the_truncated_snr_weighted_squared_error_of_x0():
    T = 50
    config = DiffusionConfig(timesteps=T, schedule="cosine", prediction="v")
    schedule = build_schedule(config)
    student = Denoiser(Affine(0.5, 0.1, T), schedule, config, image_size=4)
    g = torch.Generator().manual_seed(1)
    z, target = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    t = torch.tensor([2, 25, 49])
    got = student_loss(student, z, t, target)
    abar = schedule.alphas_cumprod_float64[t].view(-1, 1, 1, 1)
    v = 0.5 * z.double() + 0.1 * (t.double() / T).view(-1, 1, 1, 1)
    x0 = abar.sqrt() * z.double() - (1 - abar).sqrt() * v  # unclipped
    weight = torch.clamp(abar / (1 - abar), min=1.0).flatten()
    want = (weight * (x0 - target.double()).square().flatten(1).mean(1)).mean()
    assert math.isclose(got.item(), want.item(), rel_tol=1e-5)
    assert weight[0] > 1 and weight[2] == 1  # clean steps weighted by their SNR, noisy ones by 1
