import hashlib

import pytest
import torch

from ddpmkit import UNet, build_model
from ddpmkit.models import PRESETS


@pytest.mark.parametrize("size", sorted(PRESETS))
@pytest.mark.parametrize("channels", [1, 3])
def test_preset_output_shape(size, channels):
    model = build_model(PRESETS[size], channels)
    side = 2 ** (len(PRESETS[size].channel_mults) - 1) * 2
    x = torch.randn(2, channels, side, side)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape


def test_seed_unet_matches_tutorial_layout():
    model = UNet()  # the tutorial's 64x64 network
    n_params = sum(p.numel() for p in model.parameters())
    assert 23.0e6 < n_params < 23.6e6
    out = model(torch.randn(1, 3, 64, 64), torch.tensor([10]))
    assert out.shape == (1, 3, 64, 64)
    attn = [type(m).__name__ for m in list(model.down_attn) + list(model.up_attn)]
    assert attn == ["SelfAttention"] * 6


def test_learned_variance_channels_and_fractional_time():
    model = UNet(c_in=3, c_out=6, base_channels=16, channel_mults=(1, 2), attn_levels=(1,), time_dim=32)
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.25]))
    assert out.shape == (2, 6, 8, 8)


def test_time_conditioning_changes_output():
    torch.manual_seed(0)
    model = UNet(c_in=1, c_out=1, base_channels=16, channel_mults=(1, 2), attn_levels=(), time_dim=32).eval()
    x = torch.randn(1, 1, 8, 8)
    assert not torch.allclose(model(x, torch.tensor([0])), model(x, torch.tensor([500])))


def test_indivisible_size_is_rejected():
    model = UNet(c_in=3, c_out=3, base_channels=8, channel_mults=(1, 2, 2), attn_levels=(), time_dim=16)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 3, 10, 10), torch.tensor([0]))


def test_seed_unet_state_dict_keys_are_unchanged():
    """Checkpoints of the seed's network must keep loading: its parameter names and shapes are
    pinned (the digest of the version before the ADM backbone and grad checkpointing)."""
    model = UNet()
    model.set_grad_checkpointing(True)
    layout = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    assert hashlib.sha256(layout.encode()).hexdigest() == \
        "385c4a8926e74e109ec8e009ca5062656c3018dde79419bf7b7113eadbd1e8d5"
