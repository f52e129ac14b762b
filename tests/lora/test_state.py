"""lora.state: PEFT keys and state dicts, factors → ΔW (numpy reference), packing round trips; residual pairs and
scales folded into an exact rank-2r LoRA."""

import numpy as np
import pytest
import timm
import torch

from loradar_cli.errors import IncompatibleError
from loradar_cli.lora.init import init_lora
from loradar_cli.lora.inject import inject_lora, lora_layers, select_targets
from loradar_cli.lora.spec import LoraSpec
from loradar_cli.lora.state import (
    PEFT_PREFIX,
    LoraFactors,
    adapter_tensors,
    dense_key,
    factor_groups,
    factors_to_delta,
    head_tensors,
    load_lora_state_dict,
    lora_state_dict,
    pack,
    stored_deltas,
    stored_factors,
    stored_groups,
)


def _model(init: str, scale: bool = False):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5).eval()
    spec = LoraSpec(r=2, lora_alpha=4.0, targets=select_targets(model, "block-conv1"), head="fc")
    layers = inject_lora(model, spec)
    init_lora(layers, init)
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        if scale:
            layer.add_scale(0.0).data.fill_(1.7)
    return model, spec


def test_plain_adapters_are_stored_unchanged():
    model, spec = _model("kaiming")
    stored_spec, tensors = adapter_tensors(model, spec)
    assert stored_spec == spec
    layer = lora_layers(model)["layer1.0.conv1"]
    assert torch.equal(tensors[f"{PEFT_PREFIX}layer1.0.conv1.lora_B.weight"], layer.lora_B.weight)


def test_residual_and_scale_fold_into_a_rank_2r_lora_with_the_same_delta():
    model, spec = _model("svd", scale=True)
    stored_spec, tensors = adapter_tensors(model, spec)
    assert stored_spec.r == 4 and stored_spec.lora_alpha == 8.0 and not stored_spec.rank_pattern
    deltas = stored_deltas(stored_spec, tensors)
    for name, layer in lora_layers(model).items():
        w0 = layer.base_layer.weight
        a, b, a0, b0 = layer.lora_A.weight, layer.lora_B.weight, layer.lora_A0, layer.lora_B0
        expected = (1.7 * b.flatten(1) @ a.flatten(1) - b0.flatten(1) @ a0.flatten(1)) * layer.scaling
        torch.testing.assert_close(deltas[name], expected.reshape(w0.shape), rtol=1e-5, atol=1e-6)
    x = torch.rand(2, 3, 32, 32)
    fresh = timm.create_model("test_resnet", num_classes=5).eval()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k})
    inject_lora(fresh, stored_spec)
    for name, layer in lora_layers(fresh).items():
        layer.lora_A.weight.data.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
        layer.lora_B.weight.data.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))  # same kernels, same values: bit-identical


def test_state_dict_round_trip_and_stored_deltas():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5)
    spec = LoraSpec(r=2, lora_alpha=4, targets=select_targets(model, "block-conv1"), head="fc")
    inject_lora(model, spec)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight)
    tensors = lora_state_dict(model, spec)
    assert f"{PEFT_PREFIX}layer1.0.conv1.lora_A.weight" in tensors
    assert f"{PEFT_PREFIX}fc.weight" in tensors
    # only LoRA factors and the head are trainable
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("fc.") for n in trainable)

    fresh = timm.create_model("test_resnet", num_classes=5)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k}, strict=False)
    inject_lora(fresh, spec)
    load_lora_state_dict(fresh, spec, tensors)
    x = torch.rand(2, 3, 32, 32)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))

    deltas = stored_deltas(spec, tensors)
    layer = lora_layers(model)["layer1.0.conv1"]
    torch.testing.assert_close(deltas["layer1.0.conv1"], layer.delta_weight())


def test_load_refuses_wrong_shapes():
    model = timm.create_model("test_resnet", num_classes=5)
    spec = LoraSpec(r=2, targets=["layer1.0.conv1"])
    inject_lora(model, spec)
    tensors = lora_state_dict(model, spec)
    tensors[f"{PEFT_PREFIX}layer1.0.conv1.lora_A.weight"] = torch.zeros(3, 1, 1, 1)
    with pytest.raises(IncompatibleError, match="shape"):
        load_lora_state_dict(model, spec, tensors)


def test_factor_groups_from_shapes():
    assert factor_groups(torch.zeros(4, 8), torch.zeros(6, 4)) == 1
    assert factor_groups(torch.zeros(4, 2, 3, 3), torch.zeros(8, 2, 1, 1)) == 2  # r = 4, r/g = 2
    with pytest.raises(IncompatibleError):
        factor_groups(torch.zeros(4, 2, 3, 3), torch.zeros(8, 3, 1, 1))  # 3 does not divide 4


def _grouped_delta_numpy(a: np.ndarray, b: np.ndarray, groups: int) -> np.ndarray:
    """Independent grouped ΔW: output channel o (group o // (out/g)) reads the rank channels of its group."""
    r, cin, kh, kw = a.shape
    out, rg = b.shape[0], r // groups
    delta = np.zeros((out, cin, kh, kw))
    for o in range(out):
        grp = o // (out // groups)
        for j in range(rg):
            delta[o] += b[o, j, 0, 0] * a[grp * rg + j]
    return delta


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_factors_to_delta_matches_a_numpy_reference_for_linear_and_grouped_conv(groups):
    g = torch.Generator().manual_seed(groups)
    a, b = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(factors_to_delta(LoraFactors(a, b, 0.5)).numpy(), 0.5 * b.numpy() @ a.numpy())
    a = torch.randn(4, 8 // groups, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(8, 4 // groups, 1, 1, generator=g, dtype=torch.float64)
    expected = 2.0 * _grouped_delta_numpy(a.numpy(), b.numpy(), groups)
    np.testing.assert_allclose(factors_to_delta(LoraFactors(a, b, 2.0)).numpy(), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(IncompatibleError, match="both 2-D or both 4-D"):
        factors_to_delta((a, b.flatten(1)))


def test_pack_round_trips_factors_dense_deltas_and_head():
    """pack → stored_factors/stored_deltas/head_tensors gives back what went in; alpha = scale·r per layer."""
    g = torch.Generator().manual_seed(3)
    layers = {
        "fc1": LoraFactors(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 1.0),
        "conv": LoraFactors(torch.randn(4, 3, 3, 3, generator=g), torch.randn(6, 4, 1, 1, generator=g), 0.25),
    }
    dense = {"fc2": torch.randn(5, 5, generator=g)}
    head = {"weight": torch.randn(3, 5, generator=g), "bias": torch.randn(3, generator=g)}
    spec, tensors = pack(layers, dense, "head", head)
    assert spec.targets == ["fc1", "conv"] and spec.head == "head" and spec.r == 4
    assert (spec.rank_of("fc1"), spec.alpha_of("fc1"), spec.alpha_of("conv")) == (2, 2.0, 1.0)
    assert set(tensors) == {
        f"{PEFT_PREFIX}fc1.lora_A.weight", f"{PEFT_PREFIX}fc1.lora_B.weight", f"{PEFT_PREFIX}conv.lora_A.weight",
        f"{PEFT_PREFIX}conv.lora_B.weight", dense_key("fc2"), f"{PEFT_PREFIX}head.weight", f"{PEFT_PREFIX}head.bias",
    }  # fmt: skip
    for name, f in stored_factors(spec, tensors).items():
        assert torch.equal(f.a, layers[name].a) and torch.equal(f.b, layers[name].b) and f.scale == layers[name].scale
    deltas = stored_deltas(spec, tensors, dense=["fc2"])
    torch.testing.assert_close(
        deltas["conv"], 0.25 * torch.einsum("or,rihw->oihw", layers["conv"].b[:, :, 0, 0], layers["conv"].a)
    )
    assert torch.equal(deltas["fc2"], dense["fc2"])
    assert stored_groups(spec, tensors) == {"fc1": 1, "conv": 1}
    assert {k: torch.equal(v, head[k]) for k, v in head_tensors(tensors, spec).items()} == {
        "weight": True,
        "bias": True,
    }
