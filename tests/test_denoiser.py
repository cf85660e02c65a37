"""The denoiser: a network read through its parameterisation (eps, x_0 or v, fixed or
learned variance), on a respaced schedule, with guidance, and its training loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from ddpm_cars import diffusion
from ddpm_cars.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, TrainConfig
from ddpm_cars.denoiser import Denoiser, Prediction
from ddpm_cars.models.embeddings import ClassEmbedding
from ddpm_cars.schedule import NoiseSchedule

T = 1000
BETAS = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)  # the T = 1000 linear schedule, by hand
ABAR = torch.cumprod(1 - BETAS, 0)


@pytest.fixture
def schedule():
    return NoiseSchedule.linear(T)


def _abar(t: torch.Tensor) -> torch.Tensor:
    return ABAR[t].view(-1, 1, 1, 1)


def _beta_tilde(i: int) -> torch.Tensor:
    """beta_tilde of 0-indexed step i >= 1: beta_i (1 - alphabar_{i-1}) / (1 - alphabar_i)."""
    return BETAS[i] * (1 - ABAR[i - 1]) / (1 - ABAR[i])


class Probe(torch.nn.Module):
    """A stand-in network: out = 0.3 x_t + 0.001 t on the mean channels, then ``var`` on any
    variance channels; records the steps it is told."""

    def __init__(self, var: float | None = None):
        super().__init__()
        self.var, self.seen = var, []

    def forward(self, x, t, y=None):
        self.seen.append(t.tolist())
        out = 0.3 * x + 0.001 * t.view(-1, 1, 1, 1).float()
        return out if self.var is None else torch.cat([out, torch.full_like(x, self.var)], dim=1)


def _denoiser(network, schedule, **config) -> Denoiser:
    return Denoiser(network, schedule, DiffusionConfig(**config), image_size=4)


def _out(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The Probe's mean output, in float64."""
    return 0.3 * x_t.double() + 0.001 * t.view(-1, 1, 1, 1).double()


STEPS = torch.tensor([0, 10, 500, 999])


# -- predict ------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_predict_reads_each_parameterisation_by_its_formula(schedule, prediction):
    x_t = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    pred = _denoiser(Probe(), schedule, prediction=prediction).predict(x_t, STEPS, clip_x0=False)
    assert isinstance(pred, Prediction)
    out, x, ab = _out(x_t, STEPS), x_t.double(), _abar(STEPS)
    if prediction == "eps":  # x_0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)  (Eq. 4 inverted)
        x0, eps = (x - (1 - ab).sqrt() * out) / ab.sqrt(), out
    elif prediction == "x0":  # eps = (x_t - sqrt(ab) x_0) / sqrt(1 - ab)
        x0, eps = out, (x - ab.sqrt() * out) / (1 - ab).sqrt()
    else:  # v = sqrt(ab) eps - sqrt(1 - ab) x_0, x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps (Salimans & Ho 2022)
        x0, eps = ab.sqrt() * x - (1 - ab).sqrt() * out, (1 - ab).sqrt() * x + ab.sqrt() * out
    # float32 rounding of x_t is amplified by 1 / sqrt(alphabar) (about 160 at t = 999) in x_0
    assert torch.allclose(pred.x0.double(), x0, rtol=1e-5, atol=1e-7 / ab.sqrt().min().item())
    assert torch.allclose(pred.eps.double(), eps, rtol=1e-4, atol=1e-4)
    assert pred.x0.dtype == pred.eps.dtype == pred.log_var.dtype == torch.float32


def test_clipping_bounds_x0_and_recomputes_eps_from_it(schedule):
    x_t = 3 * torch.randn(4, 3, 4, 4)
    pred = _denoiser(Probe(), schedule, prediction="x0").predict(x_t, STEPS, clip_x0=True)
    out, ab = _out(x_t, STEPS), _abar(STEPS)
    assert (out.abs() > 1).any()
    x0 = out.clamp(-1, 1)
    assert torch.allclose(pred.x0.double(), x0, atol=1e-6)
    assert torch.allclose(pred.eps.double(), (x_t.double() - ab.sqrt() * x0) / (1 - ab).sqrt(), rtol=1e-4, atol=1e-4)


def test_fixed_variances_and_the_decoders(schedule):
    """ "beta" is log beta_t, "beta_tilde" log beta_tilde_t; at t = 0 both are log beta_tilde
    of step 1 (beta_tilde_0 is 0), the decoder variance of the published code."""
    x_t = torch.randn(4, 3, 4, 4)
    den = _denoiser(Probe(), schedule)
    beta = den.predict(x_t, STEPS, variance="beta").log_var
    tilde = den.predict(x_t, STEPS, variance="beta_tilde").log_var
    assert beta.shape == tilde.shape == x_t.shape
    expected_beta = torch.stack([_beta_tilde(1), BETAS[10], BETAS[500], BETAS[999]]).log()
    expected_tilde = torch.stack([_beta_tilde(1), _beta_tilde(10), _beta_tilde(500), _beta_tilde(999)]).log()
    assert torch.allclose(beta[:, 0, 0, 0].double(), expected_beta, rtol=1e-6)
    assert torch.allclose(tilde[:, 0, 0, 0].double(), expected_tilde, rtol=1e-6)
    assert (beta == beta[:, :1, :1, :1]).all()


@pytest.mark.parametrize("v", [-1.0, 0.0, 0.4, 1.0])
def test_learned_variance_interpolates_log_beta_and_log_beta_tilde(schedule, v):
    """Eq. 15 of Nichol & Dhariwal (2021): log sigma^2 = f log beta_t + (1 - f) log beta_tilde_t,
    f = (v + 1) / 2; the first three channels are read as without a learned variance."""
    x_t, t = torch.randn(3, 3, 4, 4), torch.tensor([1, 200, 999])
    pred = _denoiser(Probe(var=v), schedule, learn_variance=True).predict(x_t, t, clip_x0=False)
    f = (v + 1) / 2
    expected = torch.stack([f * BETAS[i].log() + (1 - f) * _beta_tilde(i).log() for i in t.tolist()])
    assert torch.allclose(pred.log_var[:, 0, 0, 0].double(), expected, rtol=1e-5)
    fixed = _denoiser(Probe(), schedule).predict(x_t, t, clip_x0=False)
    assert torch.allclose(pred.x0, fixed.x0) and torch.allclose(pred.eps, fixed.eps)


def test_output_and_read_are_predict_in_two_halves(schedule):
    x_t, t = torch.randn(4, 3, 4, 4), STEPS
    den = _denoiser(Probe(var=0.5), schedule, learn_variance=True, prediction="v")
    out = den.output(x_t, t)
    assert out.shape == (4, 6, 4, 4) and out.dtype == torch.float32
    for a, b in zip(den.read(out, x_t, t, clip_x0=True), den.predict(x_t, t, clip_x0=True)):
        assert torch.equal(a, b)


# -- respacing ----------------------------------------------------------------------------


def test_respaced_denoiser_tells_the_network_the_training_steps(schedule):
    ts = torch.tensor([0, 4, 250, 999])
    probe = Probe()
    full = _denoiser(probe, schedule)
    respaced = full.respaced(ts)
    assert respaced.schedule.timesteps == 4 and [respaced.network_step(i) for i in range(4)] == ts.tolist()
    assert torch.allclose(respaced.schedule.alphas_cumprod.double(), ABAR[ts], rtol=1e-6)
    x_t = torch.randn(4, 3, 4, 4)
    probe.seen.clear()
    pred = respaced.predict(x_t, torch.tensor([3, 2, 1, 0]), clip_x0=False)
    assert probe.seen == [[999, 250, 4, 0]]
    # step i of the respaced schedule has alphabar of training step ts[i]: the same x_0 and eps
    same = full.predict(x_t, torch.tensor([999, 250, 4, 0]), clip_x0=False)
    assert torch.allclose(pred.x0, same.x0, rtol=1e-5, atol=1e-5)
    assert torch.allclose(pred.eps, same.eps, rtol=1e-5, atol=1e-5)
    assert full.respaced(torch.arange(T)) is full


# -- guidance -----------------------------------------------------------------------------


class Conditional(torch.nn.Module):
    """A stand-in class-conditional network: 0.3 x_t plus a learned vector per label (the
    null class when no label is given) on every output channel."""

    def __init__(self, classes: int, channels: int):
        super().__init__()
        self.embed = ClassEmbedding(classes, channels)  # what num_classes(network) finds
        with torch.no_grad():
            self.embed.table.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))

    def forward(self, x, t, y=None):
        if y is None:
            y = torch.full((x.shape[0],), self.embed.null_label, dtype=torch.long)
        base = torch.cat([0.3 * x] * (self.embed.table.weight.shape[1] // x.shape[1]), dim=1)
        return base + 0.001 * t.view(-1, 1, 1, 1).float() + self.embed(y)[:, :, None, None]


@pytest.mark.parametrize("learn_variance", [False, True])
@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_guided_output_extrapolates_from_unconditional_to_conditional(schedule, learn_variance, scale):
    """Classifier-free guidance (Ho & Salimans 2022): uncond + s (cond - uncond) on the mean
    channels; a learned variance is the conditional prediction's, except at s = 0, which is
    the unconditional model outright (see test_conditioning.py)."""
    channels = 6 if learn_variance else 3
    den = _denoiser(Conditional(3, channels), schedule, learn_variance=learn_variance)
    assert den.num_classes == 3
    x_t, t, labels = torch.randn(4, 3, 4, 4), STEPS, torch.tensor([0, 2, 1, 2])
    cond, uncond = den.output(x_t, t, labels), den.output(x_t, t)
    assert not torch.allclose(cond, uncond, atol=1e-3)
    guided = den.guided(labels, scale)
    out = guided.output(x_t, t)
    assert out.shape == (4, channels, 4, 4)
    assert torch.allclose(out[:, :3], uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3]), atol=1e-5)
    assert torch.allclose(out[:, 3:], (uncond if scale == 0 else cond)[:, 3:], atol=1e-6)
    # the guided denoiser reads its output as the plain one would
    for a, b in zip(guided.predict(x_t, t), den.read(out, x_t, t)):
        assert torch.allclose(a, b, atol=1e-6)


# -- the training loss --------------------------------------------------------------------


def _x_t(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Eq. 4 of Ho et al. (2020) in float64, by hand."""
    ab = _abar(t)
    return ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_without_learned_variance_is_l_simple(schedule, prediction):
    """L_simple (Eq. 14, Ho et al. 2020): the mean squared error between the network's output
    at (x_t, t) and its target, with no bound term."""
    x0, noise, t = torch.rand(4, 3, 4, 4) * 2 - 1, torch.randn(4, 3, 4, 4), STEPS
    probe = Probe()
    loss = _denoiser(probe, schedule, loss="l2", prediction=prediction).loss(x0, t, noise)
    assert probe.seen == [t.tolist()]
    ab = _abar(t)
    target = {
        "eps": noise.double(),
        "x0": x0.double(),
        "v": ab.sqrt() * noise.double() - (1 - ab).sqrt() * x0.double(),
    }[prediction]
    expected = ((_out(_x_t(x0, t, noise), t) - target) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("prediction, loss_type", [("eps", "l2"), ("x0", "l2"), ("v", "l2"), ("eps", "l1")])
def test_min_snr_weights_each_example_by_min_snr_gamma_in_x0_terms(schedule, prediction, loss_type):
    """Min-SNR-gamma (Hang et al. 2023): each example's error weighted so that in x_0 terms
    it is min(SNR_t, gamma) times the x_0 error; for eps (whose error is SNR_t times the
    x_0 error) that is min(SNR_t, gamma) / SNR_t, for v min(SNR_t, gamma) / (SNR_t + 1)."""
    x0, noise, t = torch.rand(4, 3, 4, 4) * 2 - 1, torch.randn(4, 3, 4, 4), STEPS
    loss = _denoiser(Probe(), schedule, loss=loss_type, prediction=prediction, min_snr_gamma=5.0).loss(x0, t, noise)
    ab = _abar(t)
    snr = (ab / (1 - ab)).flatten()
    clipped = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64))
    weight = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[prediction]
    target = {"eps": noise.double(), "x0": x0.double(), "v": ab.sqrt() * noise.double() - (1 - ab).sqrt() * x0.double()}
    diff = _out(_x_t(x0, t, noise), t) - target[prediction]
    per_example = (diff**2 if loss_type == "l2" else diff.abs()).flatten(1).mean(1)
    assert weight.max() / weight.min() > 100  # the weights differ: a plain mean would fail the check below
    assert loss.item() == pytest.approx((weight * per_example).mean().item(), rel=1e-5)


def test_min_snr_gamma_above_every_snr_is_the_plain_eps_loss(schedule):
    x0, noise, t = torch.rand(4, 3, 4, 4) * 2 - 1, torch.randn(4, 3, 4, 4), STEPS
    plain = _denoiser(Probe(), schedule, loss="l2").loss(x0, t, noise)
    weighted = _denoiser(Probe(), schedule, loss="l2", min_snr_gamma=1e9).loss(x0, t, noise)
    assert weighted.item() == pytest.approx(plain.item(), rel=1e-6)


class Recorder(torch.nn.Module):
    """Returns a fixed function of x_t and remembers its inputs."""

    def forward(self, x, t):
        self.seen = (x.clone(), t.clone())
        return 0.5 * x


@pytest.mark.parametrize("loss_type, fn", [("l1", F.l1_loss), ("l2", F.mse_loss)])
def test_training_loss_compares_predicted_and_true_noise(schedule, loss_type, fn):
    model = Recorder()
    x0, noise, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.tensor([5, 50, 500])
    loss = _denoiser(model, schedule, loss=loss_type).loss(x0, t, noise)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    assert torch.equal(model.seen[1], t) and torch.allclose(model.seen[0], x_t)
    assert loss.item() == pytest.approx(fn(0.5 * x_t, noise).item(), rel=1e-6)


def test_without_learned_variance_the_loss_has_no_bound_term(schedule):
    x0, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([3, 30])
    loss = _denoiser(Recorder(), schedule, loss="l2", prediction="x0").loss(x0, t, noise)
    assert loss.item() == pytest.approx(
        F.mse_loss(0.5 * diffusion.q_sample(schedule, x0, t, noise), x0).item(), rel=1e-6
    )


class TwoHeads(torch.nn.Module):
    """Mean channels from one parameter, variance channels from another."""

    def __init__(self):
        super().__init__()
        self.mean_scale = torch.nn.Parameter(torch.tensor(0.3))
        self.var_value = torch.nn.Parameter(torch.tensor(0.2))

    def forward(self, x, t):
        return torch.cat([self.mean_scale * x, self.var_value.expand_as(x)], dim=1)


def test_hybrid_loss_is_simple_plus_weighted_vlb_with_stop_gradient(schedule):
    x0, noise, t = torch.rand(4, 3, 4, 4) * 2 - 1, torch.randn(4, 3, 4, 4), torch.tensor([0, 3, 200, 999])
    model = TwoHeads()
    loss = _denoiser(model, schedule, loss="l2", learn_variance=True).loss(x0, t, noise)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    simple = F.mse_loss(0.3 * x_t, noise)
    # p(x_{t-1} | x_t): the posterior mean around the predicted x_0 (unclipped), Eq. 15's variance
    x0_pred = diffusion.predict_x0_from_eps(schedule, x_t, t, 0.3 * x_t)
    mean = diffusion.posterior_mean(schedule, x0_pred, x_t, t)
    log_var = diffusion.learned_log_variance(schedule, t, torch.full_like(x_t, 0.2))
    vlb = 1000 * diffusion.vlb_term(schedule, x0, x_t, t, mean, log_var).mean()
    assert loss.item() == pytest.approx(simple.item() + 0.001 * vlb.item(), rel=1e-5)
    loss.backward()
    # the mean parameter sees L_simple only; the variance parameter sees the bound only
    scale = torch.tensor(0.3, requires_grad=True)
    F.mse_loss(scale * x_t, noise).backward()
    assert model.mean_scale.grad.item() == pytest.approx(scale.grad.item(), rel=1e-5)
    assert model.var_value.grad.abs().item() > 0


# -- a run's denoiser ---------------------------------------------------------------------


def test_for_run_takes_the_runs_schedule_parameterisation_and_size():
    config = RunConfig(
        model=ModelConfig(channels=(8, 16), time_emb_dim=8),
        diffusion=DiffusionConfig(timesteps=50, schedule="cosine", prediction="v", learn_variance=True),
        data=DataConfig(image_size=16),
        train=TrainConfig(precision="fp32"),
    )
    den = Denoiser.for_run(Probe(var=0.0), config)
    assert den.config == config.diffusion and den.image_size == 16 and den.precision == "fp32"
    assert den.schedule.timesteps == 50 and den.timesteps is None
    # cosine alphabar (Eq. 17, Nichol & Dhariwal 2021) at the first step
    f = lambda u: math.cos((u / 50 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert den.schedule.alphas_cumprod[0].item() == pytest.approx(f(1) / f(0), rel=1e-5)
    assert den.device == torch.device("cpu") and den.num_classes == 0
