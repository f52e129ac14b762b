"""Stored adapter tensors: plain LoRAs as they are; residual pairs and scales folded into an exact rank-2r LoRA."""

import timm
import torch

from loradar_cli.lora.init import init_lora
from loradar_cli.lora.inject import PEFT_PREFIX, delta_weights, inject_lora, lora_layers, select_targets
from loradar_cli.lora.spec import LoraSpec
from loradar_cli.lora.state import adapter_tensors


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
    deltas = delta_weights(tensors, stored_spec)
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
