"""ddpm-cars: denoising diffusion probabilistic models that generate cars."""

__version__ = "0.1.0"
