"""The denoiser: a network together with everything needed to read its output.

The network is a plain ``model(x_t, t, y=None) -> tensor`` that knows nothing about
diffusion. The :class:`Denoiser` -- EDM's preconditioning idea (Karras et al. 2022) --
adds what gives that tensor a meaning: the noise schedule, what the network predicts
(eps, x_0 or v), whether it also outputs the variance, which training step each step
of a respaced schedule is, and the precision it runs in. Samplers, the likelihood and
the training loss ask the denoiser (:meth:`Denoiser.predict`, :meth:`Denoiser.loss`),
never the network, so no caller can read an output with the wrong parameterisation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_cars import diffusion
from ddpm_cars.conditioning import ClassifierFreeGuidance
from ddpm_cars.config import DiffusionConfig, Precision, RunConfig, Variance
from ddpm_cars.models import num_classes
from ddpm_cars.runtime import autocast
from ddpm_cars.schedule import NoiseSchedule, build_schedule


class Prediction(NamedTuple):
    """What the denoiser says about x_t, each ``[B, C, H, W]``."""

    x0: torch.Tensor  # the predicted clean image (clipped to [-1, 1] when asked)
    eps: torch.Tensor  # the noise implied by x_t and that x_0
    log_var: torch.Tensor  # log sigma_t^2 of p(x_{t-1} | x_t): learned, or the fixed choice


@dataclass(frozen=True)
class Denoiser:
    """``network`` read through ``config``'s parameterisation on ``schedule``, for images of
    ``image_size`` pixels and ``image_channels`` channels.

    Steps ``t`` given to its methods index ``schedule``; when the schedule is respaced
    (:meth:`respaced`), ``timesteps[t]`` is the training step the network is told.
    The network runs under ``precision`` autocast; everything after it is float32.
    """

    network: nn.Module
    schedule: NoiseSchedule
    config: DiffusionConfig
    image_size: int
    precision: Precision = "fp32"
    timesteps: torch.Tensor | None = None  # [len(schedule)] training steps of a respaced schedule
    image_channels: int = 3  # C of the images x_t [B, C, S, S] it denoises

    @classmethod
    def for_run(cls, network: nn.Module, config: RunConfig) -> Denoiser:
        """The denoiser of a run's network: its schedule, parameterisation, size and precision."""
        return cls(
            network,
            build_schedule(config.diffusion),
            config.diffusion,
            config.data.image_size,
            config.train.precision,
            image_channels=config.image_channels,
        )

    @property
    def device(self) -> torch.device:
        """Where the network's weights are (the CPU for a network without any)."""
        weights = next(self.network.parameters(), None)
        return weights.device if weights is not None else torch.device("cpu")

    @property
    def num_classes(self) -> int:
        """Classes the network is conditioned on; 0 for an unconditional one."""
        return num_classes(self.network)

    def respaced(self, timesteps: torch.Tensor) -> Denoiser:
        """This denoiser on the increasing subsequence ``timesteps`` of its training steps
        (Nichol & Dhariwal 2021, Sec. 4); itself when that is all of them."""
        assert self.timesteps is None, "respace the training-step denoiser, not a respaced one"
        if len(timesteps) == self.schedule.timesteps:
            return self
        return dataclasses.replace(self, schedule=self.schedule.respace(timesteps), timesteps=timesteps.long())

    def guided(self, labels: torch.Tensor, scale: float) -> Denoiser:
        """This denoiser drawing image ``i`` of a batch towards class ``labels[i]`` with
        classifier-free guidance ``scale`` (see :mod:`ddpm_cars.conditioning`)."""
        return dataclasses.replace(self, network=ClassifierFreeGuidance(self.network, labels, scale, self.num_classes))

    def network_step(self, i: int) -> int:
        """The training step the network is told at step ``i`` of the schedule."""
        return i if self.timesteps is None else int(self.timesteps[i])

    def output(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The raw network output at steps ``t`` ``[B]``, float32: the mean's target
        (the image's C channels), then the variance interpolation when it is learned (C more)."""
        if self.timesteps is not None:
            t = self.timesteps.to(t.device)[t]
        with autocast(x_t.device, self.precision):
            out = self.network(x_t, t) if y is None else self.network(x_t, t, y)
        return out.float()

    def read(
        self,
        output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        clip_x0: bool = True,
        variance: Variance = "beta",
    ) -> Prediction:
        """The prediction a network ``output`` makes at (x_t, t). The x_0 is clipped to
        [-1, 1] with ``clip_x0`` and eps recomputed from it; the variance is the learned
        one when the network has it (Eq. 15, Nichol & Dhariwal 2021), else ``variance``."""
        mean_out, var_out = self._split(output)
        x0 = diffusion.predict_x0(self.schedule, x_t, t, mean_out, self.config.prediction)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        if var_out is not None:
            log_var = diffusion.learned_log_variance(self.schedule, t, var_out)
        else:
            log_var = diffusion.fixed_log_variance(self.schedule, t, x_t, variance).expand_as(x_t)
        return Prediction(x0, diffusion.predict_eps(self.schedule, x_t, t, x0), log_var)

    def predict(
        self, x_t: torch.Tensor, t: torch.Tensor, *, clip_x0: bool = True, variance: Variance = "beta"
    ) -> Prediction:
        """The network's prediction at (x_t, t): see :meth:`read`."""
        return self.read(self.output(x_t, t), x_t, t, clip_x0=clip_x0, variance=variance)

    def loss(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One term of Algorithm 1 (Ho et al. 2020): noise x_0 to x_t, predict the target
        (given labels ``y`` for a class-conditional network), compare.

        ``l2`` on eps is L_simple (Eq. 14); ``l1`` is the seed's choice. With a learned
        variance the loss is L_hybrid = L_simple + lambda * L_vlb (Nichol & Dhariwal 2021,
        Sec. 3.1), where L_vlb is estimated from this step's t as T * L_t and sees the mean
        through a stop-gradient, so it trains the variance alone.
        """
        x_t = diffusion.q_sample(self.schedule, x0, t, noise)
        output = self.output(x_t, t, y)
        mean_out, var_out = self._split(output)
        target = diffusion.prediction_target(self.schedule, x0, t, noise, self.config.prediction)
        loss = self._simple_loss(mean_out, target, t)
        if var_out is None:
            return loss
        frozen = self.read(torch.cat([mean_out.detach(), var_out], dim=1), x_t, t, clip_x0=False)
        mean = diffusion.posterior_mean(self.schedule, frozen.x0, x_t, t)
        l_vlb = self.schedule.timesteps * diffusion.vlb_term(self.schedule, x0, x_t, t, mean, frozen.log_var).mean()
        return loss + self.config.vlb_weight * l_vlb

    def _simple_loss(self, out: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The mean L1 or L2 error of the prediction, each example weighted by Min-SNR when asked."""
        error = F.l1_loss if self.config.loss == "l1" else F.mse_loss
        gamma = self.config.min_snr_gamma
        if not gamma:
            return error(out, target)
        per_example = error(out, target, reduction="none").flatten(1).mean(1)
        weight = diffusion.min_snr_weight(self.schedule, t, gamma, self.config.prediction)
        return (weight.to(per_example.dtype) * per_example).mean()

    def _split(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean part, variance part or None) of a network output."""
        if self.config.learn_variance:
            mean_out, var_out = output.chunk(2, dim=1)
            return mean_out, var_out
        return output, None
