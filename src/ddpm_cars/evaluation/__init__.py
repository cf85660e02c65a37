"""Evaluation: likelihood (bits per dimension) of held-out images, and sample quality --
SWD (offline), FID/KID and precision/recall, the memorisation check -- of generated ones.

The sample metrics live in their own modules (``swd``, ``feature_distances``,
``inception``, ``sample_metrics``, ``memorization``, ``runs``), imported where used.
"""

from ddpm_cars.evaluation.likelihood import BitsPerDim, bits_per_dim

__all__ = ["BitsPerDim", "bits_per_dim"]
