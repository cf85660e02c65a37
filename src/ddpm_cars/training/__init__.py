"""Training: the loop and crash-safe checkpoints."""

from ddpm_cars.training.loop import TrainResult, resolve_device, train

__all__ = ["TrainResult", "resolve_device", "train"]
