import math

import pytest
import torch

from ddpm_cars.config import ModelConfig
from ddpm_cars.models import SimpleUnet, batchnorm_uses_batch_stats, build_model, count_parameters
from ddpm_cars.models.embeddings import SinusoidalPositionEmbeddings
from ddpm_cars.presets import SEED


def test_seed_unet_has_exactly_the_original_parameter_count():
    assert count_parameters(build_model(SEED)) == 62_438_883


def test_seed_unet_layout():
    model = SimpleUnet()
    assert [b.conv1.out_channels for b in model.downs] == [128, 256, 512, 1024]
    assert [b.conv1.out_channels for b in model.ups] == [512, 256, 128, 64]
    assert [b.conv1.in_channels for b in model.ups] == [2048, 1024, 512, 256]  # concatenated skips
    assert model.conv0.out_channels == 64 and model.output.kernel_size == (1, 1)
    assert isinstance(model.ups[0].transform, torch.nn.ConvTranspose2d)
    assert model.downs[0].transform.stride == (2, 2) and model.downs[0].transform.kernel_size == (4, 4)
    assert model.time_mlp[1].in_features == 32


@pytest.mark.parametrize("size", [16, 32, 48])
def test_output_shape_matches_input(size):
    model = SimpleUnet(channels=(8, 16, 32, 64, 128), time_emb_dim=8)
    x = torch.randn(2, 3, size, size)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


def test_image_size_not_divisible_raises():
    with pytest.raises(ValueError, match="divisible by 16"):
        SimpleUnet(channels=(8, 16, 32, 64, 128), time_emb_dim=8)(torch.randn(1, 3, 24, 24), torch.tensor([1]))


def test_output_depends_on_timestep():
    model = SimpleUnet(channels=(8, 16), time_emb_dim=8).eval()
    x = torch.randn(1, 3, 16, 16)
    assert not torch.allclose(model(x, torch.tensor([1])), model(x, torch.tensor([900])))


def test_sinusoidal_embedding_formula():
    emb = SinusoidalPositionEmbeddings(32)(torch.tensor([0, 7, 999]))
    assert emb.shape == (3, 32)
    for row, t in enumerate([0, 7, 999]):
        for i in range(16):
            freq = math.exp(-math.log(10000) * i / 15)
            assert emb[row, i].item() == pytest.approx(math.sin(t * freq), abs=1e-4)
            assert emb[row, 16 + i].item() == pytest.approx(math.cos(t * freq), abs=1e-4)


def test_batch_stats_mode_leaves_running_stats_and_mode_alone():
    model = SimpleUnet(channels=(8, 16), time_emb_dim=8)
    model.train()
    model(torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4]))  # move running stats off init
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, t = torch.randn(4, 3, 16, 16) * 3 + 1, torch.tensor([5, 5, 5, 5])
    with torch.no_grad(), batchnorm_uses_batch_stats(model):
        batch_out = model(x, t)
        assert not model.time_mlp.training and model.downs[0].bnorm1.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x, t), batch_out)  # running stats really were not used


def test_unknown_model_name_raises():
    with pytest.raises(ValueError, match="model.name"):
        ModelConfig(name="transformer")
