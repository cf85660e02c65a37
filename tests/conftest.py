import pytest
import torch

from ddpm_cars.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture
def tiny_config() -> RunConfig:
    """A model and data small enough to train for a few steps in about a second."""
    return RunConfig(
        model=ModelConfig(channels=(8, 16), time_emb_dim=8),
        diffusion=DiffusionConfig(timesteps=20),
        data=DataConfig(source="toy-cars", image_size=16, toy_count=64),
        train=TrainConfig(batch_size=16, epochs=2, sample_every_epochs=1, checkpoint_every_steps=3),
        sample=SampleConfig(num_images=4),
    )
