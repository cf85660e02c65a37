"""Evaluation: how good a model is, in one API.

- :func:`score`: sample quality of generated images against reference images -- SWD,
  pixel precision/recall and FD/KID on the features of a toy-car judge (all offline)
  always, FID/KID and Inception precision/recall with the Inception weights -- and the
  memorisation check (``scores``; the metrics themselves in ``swd``, ``feature_distances``,
  ``judge``, ``inception``, ``sample_metrics``, ``memorization``).
- :func:`bits_per_dim`: the likelihood bound of held-out images (``likelihood``).
- :func:`guidance_accuracy`: whether samples show the class asked for, at several
  classifier-free guidance scales (``guidance``, with the judge in ``class_accuracy``).
"""

from ddpm_cars.evaluation.guidance import guidance_accuracy
from ddpm_cars.evaluation.likelihood import BitsPerDim, bits_per_dim
from ddpm_cars.evaluation.scores import ReferenceData, load_inception, load_reference, score

__all__ = [
    "BitsPerDim",
    "ReferenceData",
    "bits_per_dim",
    "guidance_accuracy",
    "load_inception",
    "load_reference",
    "score",
]
