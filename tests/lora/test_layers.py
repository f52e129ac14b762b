import pytest
import torch
from torch import nn

from loradar_cli.errors import IncompatibleError
from loradar_cli.lora.layers import LoraConv2d, LoraLinear, functional_forward


def _randomise(layer):
    torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    return layer


CONV_CASES = [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "stride": 2, "padding": 1},
    {"kernel_size": 3, "padding": 2, "dilation": 2},
    {"kernel_size": 5, "padding": 2, "padding_mode": "reflect"},
    {"kernel_size": 3, "padding": 1, "groups": 4},
    {"kernel_size": 1},
]


@pytest.mark.parametrize("kwargs", CONV_CASES)
def test_conv_output_equals_base_with_merged_weight(kwargs):
    torch.manual_seed(0)
    base = nn.Conv2d(8, 16, bias=True, **kwargs)
    layer = _randomise(LoraConv2d(base, r=4, lora_alpha=8))
    x = torch.randn(2, 8, 11, 13)
    expected = functional_forward(layer, x)
    # Independent: a fresh conv carrying W0 + s·ΔW computed from the factors by einsum per group.
    g = base.groups
    a = layer.lora_A.weight.reshape(g, 4 // g, -1)
    b = layer.lora_B.weight.reshape(g, 16 // g, 4 // g)
    delta = torch.einsum("gor,gri->goi", b, a).reshape(base.weight.shape) * 2.0
    ref = nn.Conv2d(8, 16, bias=True, **kwargs)
    ref.load_state_dict({"weight": base.weight + delta, "bias": base.bias})
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expected, ref(x), rtol=1e-5, atol=1e-5)


def test_linear_output_equals_merged_weight():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = _randomise(LoraLinear(base, r=3, lora_alpha=6))
    x = torch.randn(5, 12)
    w = base.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(layer(x), x @ w.T + base.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: nn.Linear(10, 6), lambda: nn.Conv2d(4, 6, 3, padding=1)])
def test_merge_unmerge_round_trip(make):
    torch.manual_seed(1)
    layer = _randomise((LoraLinear if isinstance(make(), nn.Linear) else LoraConv2d)(make(), r=2, lora_alpha=2))
    x = torch.randn(3, 10) if isinstance(layer, LoraLinear) else torch.randn(3, 4, 6, 6)
    original = layer.base_layer.weight.clone()
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    assert not torch.equal(layer.base_layer.weight, original)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)


def test_init_is_identity_but_trainable():
    base = nn.Conv2d(3, 5, 3, padding=1)
    layer = LoraConv2d(base, r=2, lora_alpha=2)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(layer(x), base(x))
    assert layer.lora_A.weight.abs().sum() > 0  # never both zero: gradients reach B
    layer(x).sum().backward()
    assert layer.lora_B.weight.grad.abs().sum() > 0
    assert base.weight.grad is None


def test_grouped_rank_must_divide_groups():
    with pytest.raises(IncompatibleError, match="divisible"):
        LoraConv2d(nn.Conv2d(8, 8, 3, groups=8), r=4, lora_alpha=4)
