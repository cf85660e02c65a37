import pytest
import torch

from ddpm_cars.training.ema import EMA


def test_ema_follows_the_moving_average_formula():
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(0.0)
    ema = EMA(model, decay=0.9)
    expected = 0.0
    for n in range(1, 30):
        model.weight.data.fill_(float(n))
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * n
        assert ema.model.weight.item() == pytest.approx(expected, rel=1e-6)


def test_ema_copies_buffers_and_is_frozen():
    model = torch.nn.BatchNorm1d(3)
    ema = EMA(model, 0.99)
    model.running_mean.fill_(2.0)
    ema.update(model)
    assert torch.equal(ema.model.running_mean, model.running_mean)
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_bad_decay(decay):
    with pytest.raises(ValueError, match="decay"):
        EMA(torch.nn.Linear(1, 1), decay)
