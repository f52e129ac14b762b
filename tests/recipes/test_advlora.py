"""AdvLoRA: function-preserving start with the per-layer scale, the alignment term, and the PGD-3 inner attack."""

import pytest
import torch

from loradar_cli.attacks import build_attack
from loradar_cli.data import load_data
from loradar_cli.jobs.train import lora_spec_for
from loradar_cli.loading import build_model
from loradar_cli.lora.init import init_lora
from loradar_cli.lora.inject import inject_lora, lora_layers
from loradar_cli.recipes import build_recipe
from loradar_cli.recipes.advlora import alignment, with_steps
from tests.conftest import make_base


def test_start_is_the_base_and_alignment_matches_a_hand_computation(store):
    base = make_base(store)
    plain = build_model(store.load_base(base.name))
    model = build_model(store.load_base(base.name))
    init_lora(
        inject_lora(model.model, lora_spec_for(model, r=3, lora_alpha=6.0, targets=None, train_head=True)), "cluster"
    )
    data = load_data("digits", "train", limit=8, channels=1, size=16)
    recipe = build_recipe("advlora")
    recipe.prepare(model, data, data, build_attack("fgsm", eps=0.1))
    layers = lora_layers(model.model)
    assert all(layer.lora_scale is not None and layer.lora_scale.requires_grad for layer in layers.values())
    with torch.no_grad():
        torch.testing.assert_close(model(data.x), plain(data.x), rtol=1e-4, atol=1e-5)
        for layer in layers.values():
            layer.lora_scale.fill_(0.5)
    expected = 0.0
    for layer in layers.values():  # ‖W0 − s·α·B·A‖² with the one-hot B: each row minus half its scaled centre
        w0 = layer.base_layer.weight.detach().double().flatten(1)
        centre_of_row = layer.lora_A.weight.detach().double().flatten(1)[layer.lora_B.weight.flatten(1).argmax(1)]
        expected += ((w0 - 0.5 * 2.0 * centre_of_row) ** 2).sum().item()
    assert alignment(model.model).item() == pytest.approx(expected, rel=1e-5)


def test_inner_attack_is_pgd_3_with_step_2_5_eps_over_3():
    inner = with_steps(build_attack("pgd", eps=0.3, alpha=0.01, steps=10), 3)
    assert inner.config.steps == 3 and inner.config.alpha == pytest.approx(0.25) and inner.config.eps == 0.3
    fgsm = build_attack("fgsm", eps=0.3)
    assert with_steps(fgsm, 3) is fgsm  # single-step attacks have no steps to set
    pgd = build_attack("pgd", eps=0.3)
    assert with_steps(pgd, 0) is pgd
