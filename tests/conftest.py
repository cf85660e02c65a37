import os

import pytest
import torch

from ddpm_cars.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig

# `make test` runs the tests in as many worker processes as there are cores (pytest-xdist):
# each worker, and every command a test starts, then computes on its share of the cores,
# so that no two compete for one (OpenMP threads fighting for a core can be many times slower)
THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _auto_precision_is_fp32(monkeypatch):
    """``precision auto`` means fp32 in-process on every CPU, so results compared across
    runs and against float32 references do not depend on whether the CPU has bf16."""
    from ddpm_cars import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)


@pytest.fixture(autouse=True, scope="session")
def _data_cache_in_tmp(tmp_path_factory):
    """The data cache of every test, and of the commands they start, in one temporary
    folder: nothing is written under the user's home, and toy cars are generated once."""
    import os

    folder = tmp_path_factory.mktemp("data-cache")
    os.environ["DDPM_CARS_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def judge_16px(_data_cache_in_tmp):
    """The ``judge/`` folder of the session's cache folder, holding the toy-car judge at 16 px
    (trained at its first use): tests with a cache folder of their own copy it rather than
    train the judge again."""
    from ddpm_cars.evaluation.judge import load_judge

    load_judge(16, cache_dir=_data_cache_in_tmp)
    return _data_cache_in_tmp / "judge"


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


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """A state dict of torch-fidelity's Inception-v3, randomly initialised, in a .pth file."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    original = fe.FeatureExtractorInceptionV3.load_state_dict
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None  # keep the random init
    real_download = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *a, **k: {}
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fe.FeatureExtractorInceptionV3.load_state_dict = original
        fe.load_state_dict_from_url = real_download
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return path
