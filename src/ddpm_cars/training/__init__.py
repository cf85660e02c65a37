"""Training: the loop (Algorithm 1) and what surrounds it -- batches, the optimizer and
its guarded step, the EMA, the loss log, evaluation during training, stop signals."""

from ddpm_cars.training.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
