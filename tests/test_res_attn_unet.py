"""Tests of the improved U-Net (residual blocks, self-attention, adaptive group norm).

Every expected value here is computed independently of the implementation: parameter
counts from the architecture description, forward passes re-derived with
``torch.nn.functional`` and plain matmuls.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddpm_cars.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig
from ddpm_cars.models import ResAttnUnet, UnetLayout, build_model, count_parameters
from ddpm_cars.models.res_attn_unet import (
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    group_norm,
)

# Small enough for 2 CPU cores: three levels, widths 32/64/64.
TINY = {
    "image_size": 32,
    "channels": (32, 64, 64),
    "num_res_blocks": 1,
    "attention_resolutions": (16,),
    "head_channels": 32,
}


def unet(image_size: int = 64, dropout: float = 0.0, out_channels: int = 3, **layout) -> ResAttnUnet:
    """A ResAttnUnet from flat settings: the fields of its :class:`UnetLayout`, dropout, output channels."""
    return ResAttnUnet(image_size, UnetLayout(**layout), dropout=dropout, out_channels=out_channels)


# --------------------------------------------------------------------------------------
# Independent helpers
# --------------------------------------------------------------------------------------


def _gn(c):
    return 2 * c


def _conv(i, o, k):
    return k * k * i * o + o


def _lin(i, o):
    return i * o + o


def _resblock(i, o, emb):
    return _gn(i) + _conv(i, o, 3) + _lin(emb, 2 * o) + _gn(o) + _conv(o, o, 3) + (_conv(i, o, 1) if i != o else 0)


def _attn(c):
    return _gn(c) + _conv(c, 3 * c, 1) + _conv(c, c, 1)


def expected_parameter_count(
    image_size,
    channels,
    num_res_blocks,
    attention_resolutions,
    resblock_updown,
    in_channels=3,
    out_channels=3,
):
    """Parameters of the architecture, counted from its description alone."""
    base, emb = channels[0], 4 * channels[0]
    last = len(channels) - 1
    total = _lin(base, emb) + _lin(emb, emb) + _conv(in_channels, base, 3)
    skips, width = [base], base
    for level, c in enumerate(channels):
        attends = image_size // 2**level in attention_resolutions
        for _ in range(num_res_blocks):
            total += _resblock(width, c, emb) + (_attn(c) if attends else 0)
            width = c
            skips.append(width)
        if level < last:
            total += _resblock(width, width, emb) if resblock_updown else _conv(width, width, 3)
            skips.append(width)
    total += 2 * _resblock(width, width, emb) + _attn(width)
    for level in reversed(range(len(channels))):
        c = channels[level]
        attends = image_size // 2**level in attention_resolutions
        for _ in range(num_res_blocks + 1):
            total += _resblock(width + skips.pop(), c, emb) + (_attn(c) if attends else 0)
            width = c
        if level > 0:
            total += _resblock(width, width, emb) if resblock_updown else _conv(width, width, 3)
    assert not skips
    return total + _gn(width) + _conv(width, out_channels, 3)


def upsample_nearest(x):
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def avg_pool_2x2(x):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


def randomize_(module: nn.Module, std: float = 0.05):
    """Overwrite every parameter (zero-initialised ones and norm affines included)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def perturb_zero_init_(model: ResAttnUnet, std: float = 0.02):
    """Give the zero-initialised convolutions small random weights."""
    zero_convs = [m.conv2 for m in model.modules() if isinstance(m, ResBlock)]
    zero_convs += [m.proj for m in model.modules() if isinstance(m, AttentionBlock)]
    zero_convs.append(model.out[-1])
    for conv in zero_convs:
        randomize_(conv, std)
    return model


def attention_input_sizes(model, x, t):
    """Spatial size of the input to every AttentionBlock during one forward pass."""
    sizes = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[-1]))
        for m in model.modules()
        if isinstance(m, AttentionBlock)
    ]
    try:
        with torch.no_grad():
            model(x, t)
    finally:
        for h in hooks:
            h.remove()
    return sorted(sizes)


# --------------------------------------------------------------------------------------
# 1. Shapes and input validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("resblock_updown", [False, True])
@pytest.mark.parametrize("out_channels", [3, 6])
def test_output_shape(size, resblock_updown, out_channels):
    torch.manual_seed(0)
    model = unet(
        image_size=size,
        channels=(32, 64),
        num_res_blocks=1,
        attention_resolutions=(8,),
        head_channels=32,
        resblock_updown=resblock_updown,
        out_channels=out_channels,
    ).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert model(x, torch.tensor([0, 999])).shape == (2, out_channels, size, size)


def test_input_size_not_divisible_by_downsample_factor_raises():
    model = unet(**TINY)  # three levels: factor 4
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 3, 18, 18), torch.tensor([1]))
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 3, 16, 18), torch.tensor([1]))


def test_image_size_not_divisible_raises_at_construction():
    with pytest.raises(ValueError, match="divisible by 4"):
        unet(**{**TINY, "image_size": 30})


# --------------------------------------------------------------------------------------
# 2. Parameter counts and group norm
# --------------------------------------------------------------------------------------


def test_parameter_count_of_smallest_model_by_hand():
    # image 16, widths (32, 64), one res block, no attention level (only the middle one).
    # emb = 128; sums written out from the architecture description:
    parts = [  # each summed from the architecture description
        (32 * 128 + 128) + (128 * 128 + 128),  # time MLP: 20736
        27 * 32 + 32,  # input conv: 896
        64 + 9248 + 8256 + 64 + 9248,  # down ResBlock 32->32: 26880
        9248,  # Downsample conv 32->32
        64 + 18496 + 16512 + 128 + 36928 + 2112,  # down ResBlock 32->64: 74240
        2 * (128 + 36928 + 16512 + 128 + 36928),  # middle ResBlocks 64->64: 181248
        128 + 12480 + 4160,  # middle attention 64: 16768
        256 + 73792 + 16512 + 128 + 36928 + 8256,  # up ResBlock 64+64->64: 135872
        192 + 55360 + 16512 + 128 + 36928 + 6208,  # up ResBlock 64+32->64: 115328
        36928,  # Upsample conv 64->64
        192 + 27680 + 8256 + 64 + 9248 + 3104,  # up ResBlock 64+32->32: 48544
        128 + 18464 + 8256 + 64 + 9248 + 2080,  # up ResBlock 32+32->32: 38240
        64 + 867,  # out norm + conv 32->3: 931
    ]
    hand = sum(parts)
    assert hand == 705_859
    assert expected_parameter_count(16, (32, 64), 1, (), False) == hand
    model = unet(image_size=16, channels=(32, 64), num_res_blocks=1, attention_resolutions=())
    assert count_parameters(model) == hand


@pytest.mark.parametrize(
    "kwargs",
    [
        {
            "image_size": 32,
            "channels": (32, 64, 64),
            "num_res_blocks": 1,
            "attention_resolutions": (16,),
            "head_channels": 32,
            "resblock_updown": True,
            "out_channels": 6,
        },
        {
            "image_size": 32,
            "channels": (32, 64, 96),
            "num_res_blocks": 2,
            "attention_resolutions": (32, 8),
            "head_channels": 32,
            "resblock_updown": False,
            "out_channels": 3,
        },
    ],
)
def test_parameter_count_matches_architecture(kwargs):
    model = unet(**kwargs)
    expected = expected_parameter_count(
        kwargs["image_size"],
        kwargs["channels"],
        kwargs["num_res_blocks"],
        kwargs["attention_resolutions"],
        kwargs["resblock_updown"],
        out_channels=kwargs["out_channels"],
    )
    assert count_parameters(model) == expected


@pytest.mark.parametrize("resblock_updown", [False, True])
def test_parameter_count_of_64px_default_widths(resblock_updown):
    with torch.device("meta"):  # construct only: no memory, no initialisation cost
        model = unet(
            image_size=64,
            channels=(128, 256, 384, 512),
            num_res_blocks=3,
            attention_resolutions=(32, 16, 8),
            head_channels=64,
            resblock_updown=resblock_updown,
        )
    expected = expected_parameter_count(64, (128, 256, 384, 512), 3, (32, 16, 8), resblock_updown)
    assert count_parameters(model) == expected


def test_group_norm_uses_32_groups_for_multiples_of_32():
    for c in (32, 64, 96, 128, 384, 512):
        norm = group_norm(c)
        assert (norm.num_groups, norm.num_channels) == (32, c)
    with torch.device("meta"):
        model = unet(image_size=64, channels=(128, 256, 384, 512), num_res_blocks=1)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 for m in norms)


def test_group_norm_on_narrow_widths_still_divides_channels():
    for c in (8, 16, 48):
        norm = group_norm(c)
        assert c % norm.num_groups == 0 and norm.num_groups <= 32
    assert group_norm(48).num_groups == 16


# --------------------------------------------------------------------------------------
# 3. Zero initialisation
# --------------------------------------------------------------------------------------


def test_fresh_network_outputs_exactly_zero():
    torch.manual_seed(0)
    model = unet(**{**TINY, "out_channels": 6})
    x = torch.randn(2, 3, 32, 32) * 3
    with torch.no_grad():
        out = model(x, torch.tensor([3, 777]))
    assert torch.equal(out, torch.zeros(2, 6, 32, 32))


def test_residual_branches_and_attention_projections_start_at_zero():
    model = unet(**{**TINY, "resblock_updown": True})
    resblocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    attns = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert resblocks and attns
    for block in resblocks:
        assert not block.conv2.weight.any() and not block.conv2.bias.any()
        assert block.conv1.weight.abs().sum() > 0  # only the last conv is zero
    for block in attns:
        assert not block.proj.weight.any() and not block.proj.bias.any()
        assert block.qkv.weight.abs().sum() > 0


def test_fresh_resblock_is_identity_or_skip_projection():
    torch.manual_seed(0)
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    with torch.no_grad():
        same = ResBlock(32, 32, emb_dim=16)
        assert torch.equal(same(x, emb), x)
        wider = ResBlock(32, 64, emb_dim=16)
        expected = F.conv2d(x, wider.skip.weight, wider.skip.bias)
        torch.testing.assert_close(wider(x, emb), expected)
        down = ResBlock(32, 32, emb_dim=16, resample="down")
        torch.testing.assert_close(down(x, emb), avg_pool_2x2(x))
        up = ResBlock(32, 32, emb_dim=16, resample="up")
        assert torch.equal(up(x, emb), upsample_nearest(x))


def test_fresh_attention_block_is_identity():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        assert torch.equal(AttentionBlock(64, head_channels=32)(x), x)


# --------------------------------------------------------------------------------------
# 4. Residual block with adaptive group norm
# --------------------------------------------------------------------------------------


def reference_resblock(block: ResBlock, x, emb, resample=None):
    """The ResBlock forward written out with torch.nn.functional."""
    gn1, gn2 = block.norm1, block.norm2
    h = F.silu(F.group_norm(x, 32, gn1.weight, gn1.bias, gn1.eps))
    if resample == "down":
        h, x = avg_pool_2x2(h), avg_pool_2x2(x)
    elif resample == "up":
        h, x = upsample_nearest(h), upsample_nearest(x)
    h = F.conv2d(h, block.conv1.weight, block.conv1.bias, padding=1)
    scale, shift = F.linear(F.silu(emb), block.emb.weight, block.emb.bias).chunk(2, dim=1)
    h = F.group_norm(h, 32, gn2.weight, gn2.bias, gn2.eps) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    h = F.conv2d(F.silu(h), block.conv2.weight, block.conv2.bias, padding=1)
    skip = x if isinstance(block.skip, nn.Identity) else F.conv2d(x, block.skip.weight, block.skip.bias)
    return skip + h


@pytest.mark.parametrize(
    "in_ch, out_ch, resample",
    [
        (32, 64, None),
        (64, 64, None),
        (32, 32, "down"),
        (64, 32, "down"),
        (32, 32, "up"),
    ],
)
def test_resblock_matches_adaptive_group_norm_reference(in_ch, out_ch, resample):
    torch.manual_seed(0)
    block = ResBlock(in_ch, out_ch, emb_dim=16, dropout=0.0, resample=resample).eval()
    assert block.norm1.num_groups == 32 and block.norm2.num_groups == 32
    randomize_(block, std=0.1)  # non-zero conv2, non-trivial norm affines
    with torch.no_grad():  # make norm scales ~1 so the activations stay O(1)
        block.norm1.weight.add_(1.0)
        block.norm2.weight.add_(1.0)
    x, emb = torch.randn(2, in_ch, 8, 8), torch.randn(2, 16) * 2
    with torch.no_grad():
        out = block(x, emb)
        expected = reference_resblock(block, x, emb, resample)
    side = {None: 8, "down": 4, "up": 16}[resample]
    assert out.shape == (2, out_ch, side, side)
    assert expected[:, :, 0].abs().mean() > 1e-3  # the residual branch actually contributes
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_resblock_scale_and_shift_depend_on_embedding():
    torch.manual_seed(0)
    block = randomize_(ResBlock(32, 32, emb_dim=16), std=0.1).eval()
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        a, b = block(x, torch.randn(1, 16)), block(x, torch.randn(1, 16))
    assert (a - b).abs().max() > 1e-4


def test_plain_resamplers():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8)
    down, up = Downsample(32), Upsample(32)
    with torch.no_grad():
        torch.testing.assert_close(down(x), F.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1))
        torch.testing.assert_close(
            up(x),
            F.conv2d(upsample_nearest(x), up.conv.weight, up.conv.bias, padding=1),
        )
    assert down(x).shape == (2, 32, 4, 4) and up(x).shape == (2, 32, 16, 16)


# --------------------------------------------------------------------------------------
# 5. Attention
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "channels, head_channels, heads",
    [(128, 64, 2), (128, 32, 4), (64, 64, 1), (32, 64, 1)],
)
def test_number_of_heads(channels, head_channels, heads):
    assert AttentionBlock(channels, head_channels).heads == heads


def test_width_not_a_multiple_of_head_channels_raises():
    with pytest.raises(ValueError, match="multiple of 64"):
        AttentionBlock(96, head_channels=64)


def reference_attention(block: AttentionBlock, x, heads):
    """Multi-head softmax(Q K^T / sqrt(d)) V with plain matmuls; q, k, v are the three
    channel thirds of the qkv conv output, each split into `heads` consecutive groups."""
    b, c, hgt, wid = x.shape
    n, d = hgt * wid, c // heads
    h = F.group_norm(x, 32, block.norm.weight, block.norm.bias, block.norm.eps)
    qkv = torch.einsum("oc,bcn->bon", block.qkv.weight[:, :, 0, 0], h.reshape(b, c, n)) + block.qkv.bias[:, None]
    q, k, v = (t.reshape(b, heads, d, n).transpose(-1, -2) for t in qkv.chunk(3, dim=1))  # [b, heads, n, d]
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [b, heads, n, n]
    out = (weights @ v).transpose(-1, -2).reshape(b, c, n)
    out = torch.einsum("oc,bcn->bon", block.proj.weight[:, :, 0, 0], out) + block.proj.bias[:, None]
    return x + out.reshape(b, c, hgt, wid)


@pytest.mark.parametrize("channels, head_channels", [(128, 64), (64, 16), (64, 64)])
def test_attention_matches_multi_head_reference(channels, head_channels):
    torch.manual_seed(0)
    block = AttentionBlock(channels, head_channels).eval()
    heads = channels // head_channels
    randomize_(block, std=0.2)  # non-zero proj; larger qkv so the softmax is far from uniform
    with torch.no_grad():
        block.norm.weight.add_(1.0)
    x = torch.randn(2, channels, 4, 4)
    with torch.no_grad():
        out = block(x)
        expected = reference_attention(block, x, heads)
        if heads > 1:  # the head split matters: a single-head computation differs
            assert (reference_attention(block, x, 1) - expected).abs().max() > 1e-3
    assert (expected - x).abs().max() > 1e-3
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize(
    "attention_resolutions, expected_sizes",
    [
        (
            (16,),
            [8] + [16] * 5,
        ),  # level 1: 2 down + 3 up, plus the middle block at 8 px
        ((32, 8), [8] * 6 + [32] * 5),  # levels 0 and 2, plus the middle
        ((), [8]),  # only the middle block
        ((4, 64), [8]),  # resolutions that no level has
    ],
)
def test_attention_is_placed_at_requested_resolutions(attention_resolutions, expected_sizes):
    torch.manual_seed(0)
    model = unet(
        image_size=32,
        channels=(32, 64, 64),
        num_res_blocks=2,
        attention_resolutions=attention_resolutions,
        head_channels=32,
    ).eval()
    assert sum(isinstance(m, AttentionBlock) for m in model.modules()) == len(expected_sizes)
    assert attention_input_sizes(model, torch.randn(1, 3, 32, 32), torch.tensor([5])) == expected_sizes


# --------------------------------------------------------------------------------------
# 6. Time dependence, determinism, dropout
# --------------------------------------------------------------------------------------


def test_output_depends_on_timestep():
    torch.manual_seed(0)
    model = perturb_zero_init_(unet(**TINY)).eval()
    x = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)  # same image twice
    with torch.no_grad():
        out = model(x, torch.tensor([1, 500]))
    assert out.abs().max() > 0
    assert (out[0] - out[1]).abs().max() > 1e-4


def test_eval_mode_is_deterministic():
    torch.manual_seed(0)
    model = perturb_zero_init_(unet(**{**TINY, "dropout": 0.3})).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, t))


def test_dropout_varies_train_outputs_only():
    torch.manual_seed(0)
    model = perturb_zero_init_(unet(**{**TINY, "dropout": 0.5}))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        model.train()
        assert (model(x, t) - model(x, t)).abs().max() > 1e-6
        model.eval()
        evaluated = model(x, t)
        assert torch.equal(evaluated, model(x, t))
        # eval mode with dropout is exactly the network without dropout
        no_dropout = unet(**TINY)
        no_dropout.load_state_dict(model.state_dict())
        torch.testing.assert_close(no_dropout.eval()(x, t), evaluated)


def test_dropout_zero_train_mode_is_deterministic():
    torch.manual_seed(0)
    model = perturb_zero_init_(unet(**TINY)).train()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, t))


# --------------------------------------------------------------------------------------
# 7. build_model
# --------------------------------------------------------------------------------------


def _config(learn_variance=False, image_size=32, **model):
    model = {
        "name": "res_attn_unet",
        "channels": (32, 64, 96),
        "num_res_blocks": 1,
        "attention_resolutions": (16,),
        "head_channels": 32,
        **model,
    }
    return RunConfig(
        model=ModelConfig(**model),
        diffusion=DiffusionConfig(learn_variance=learn_variance),
        data=DataConfig(image_size=image_size),
    )


@pytest.mark.parametrize("learn_variance, out_channels", [(False, 3), (True, 6)])
def test_build_model_output_channels_follow_learn_variance(learn_variance, out_channels):
    torch.manual_seed(0)
    model = build_model(_config(learn_variance, image_size=16))
    assert isinstance(model, ResAttnUnet)
    assert model.out[-1].out_channels == out_channels
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16), torch.tensor([0, 1])).shape == (
            2,
            out_channels,
            16,
            16,
        )


@pytest.mark.parametrize("image_size, attended_width", [(32, 64), (64, 96)])
def test_build_model_places_attention_by_data_image_size(image_size, attended_width):
    # attention_resolutions=(16,): level 1 (width 64) at 32 px, level 2 (width 96) at 64 px
    with torch.device("meta"):
        model = build_model(_config(image_size=image_size))
    widths = [m.norm.num_channels for m in model.modules() if isinstance(m, AttentionBlock)]
    # 1 down + 2 up blocks at the attended level, and the middle block at width 96
    assert sorted(widths) == sorted([attended_width] * 3 + [96])


def test_build_model_passes_model_options():
    with torch.device("meta"):
        model = build_model(_config(num_res_blocks=2, head_channels=16, dropout=0.25, resblock_updown=True))
    assert count_parameters(model) == expected_parameter_count(32, (32, 64, 96), 2, (16,), True)
    assert {m.resample for m in model.modules() if isinstance(m, ResBlock)} == {
        "down",
        "up",
        None,
    }
    assert not any(isinstance(m, (Downsample, Upsample)) for m in model.modules())
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.25}
    assert {m.heads for m in model.modules() if isinstance(m, AttentionBlock)} == {
        4,
        6,
    }  # 64/16, 96/16
