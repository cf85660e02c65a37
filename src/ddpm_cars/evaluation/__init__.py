"""Evaluation: likelihood (bits per dimension) of held-out images."""

from ddpm_cars.evaluation.likelihood import BitsPerDim, bits_per_dim

__all__ = ["BitsPerDim", "bits_per_dim"]
