"""AutoLoRa: gradient routing of the two threads, λ from the LoRA branch's accuracy, the halving rule."""

import pytest
import torch

from loradar_cli.attacks import build_attack
from loradar_cli.data import load_data
from loradar_cli.jobs.train import lora_spec_for, train_and_store_adapter
from loradar_cli.loading import build_model
from loradar_cli.lora.inject import inject_lora, lora_layers
from loradar_cli.lora.layers import lora_switched
from loradar_cli.metrics import accuracy
from loradar_cli.recipes import build_recipe
from loradar_cli.recipes.autolora import adversarial_logits, natural_logits, should_halve, split_parameters
from loradar_cli.recipes.loop import TrainConfig
from tests.conftest import make_base


@pytest.fixture
def prepared(store):
    """(model, recipe, train data) after prepare: LoRA on every conv with non-zero B, FE unfrozen."""
    base = make_base(store)
    model = build_model(store.load_base(base.name))
    inject_lora(model.model, lora_spec_for(model, r=2, lora_alpha=None, targets="convs", train_head=True))
    torch.manual_seed(0)
    for layer in lora_layers(model.model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.3)
    data = load_data("digits", "train", limit=32, channels=1, size=16)
    recipe = build_recipe("autolora")
    recipe.prepare(model, data, data, build_attack("fgsm", eps=0.05))
    return model, recipe, data


def test_natural_loss_reaches_only_lora_and_head_adversarial_only_fe_and_head(prepared):
    model, _, data = prepared
    groups = split_parameters(model)
    assert (
        groups["fe"] and groups["lora"] and groups["head"] and all(p.requires_grad for g in groups.values() for p in g)
    )
    params = [p for g in groups.values() for p in g]
    ce = torch.nn.functional.cross_entropy
    nat = torch.autograd.grad(ce(natural_logits(model, data.x, groups["fe"]), data.y), params, allow_unused=True)
    adv = torch.autograd.grad(ce(adversarial_logits(model, data.x), data.y), params, allow_unused=True)
    role = [name for name, g in groups.items() for _ in g]
    for r, g_nat, g_adv in zip(role, nat, adv, strict=True):
        assert (g_nat is None) == (r == "fe")  # natural CE: no gradient to the feature extractor
        assert (g_adv is None) == (r == "lora")  # adversarial CE: none to the LoRA branch
    assert all(g.abs().sum() > 0 for r, g in zip(role, nat, strict=True) if r == "lora")
    assert any(g.abs().sum() > 0 for r, g in zip(role, adv, strict=True) if r == "fe")


def test_lambdas_follow_the_lora_branch_training_accuracy(prepared):
    model, recipe, data = prepared
    with lora_switched(model, True):
        sa = accuracy(model, data.x, data.y)
    with lora_switched(model, False):
        fe_only = accuracy(model, data.x, data.y)
    assert sa != fe_only  # the two threads differ, so the test tells which one SA is measured on
    recipe.on_epoch_start(model, 1)
    assert recipe.lam1 == pytest.approx(1 - sa) and recipe.lam2 == pytest.approx(6 * sa)


@pytest.mark.parametrize(
    ("ra", "changed", "best_at_start", "expected"),
    [
        ([0.1, 0.2, 0.3, 0.4, 0.5], True, 0.1, False),  # 4 of 4 epochs improve; best rose
        ([0.1, 0.2, 0.3, 0.4, 0.35], True, 0.1, False),  # 3 of 4 = 0.75·4: not fewer
        ([0.1, 0.2, 0.3, 0.25, 0.24], True, 0.1, True),  # 2 of 4 < 3
        ([0.5, 0.6, 0.7, 0.8, 0.9], False, 0.9, True),  # rate unchanged at the last checkpoint, no new best
        ([0.5, 0.6, 0.7, 0.8, 0.9], True, 0.9, False),  # ... but it was changed there: keep
    ],
)
def test_should_halve_table(ra, changed, best_at_start, expected):
    assert should_halve(ra, 0, 4, 0.75, changed, best_at_start, max(ra)) is expected


def test_halving_sets_the_rate_reloads_the_best_weights_and_stops_below_min_lr(prepared):
    model, recipe, _ = prepared
    params = [p for g in split_parameters(model).values() for p in g]
    optimizer, _ = recipe.build_optimizer(params, 1.0, 1, 1.0)
    snapshot = {}
    for epoch, robust in enumerate([0.5, 0.9, 0.4, 0.3], start=1):  # best after epoch 2; 1 of 4 improves
        with torch.no_grad():
            for p in params:
                p.add_(0.01 * epoch)
        snapshot[epoch] = [p.detach().clone() for p in params]
        stop = recipe.on_epoch_end(model, epoch, 0.9, robust)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005) and recipe.lr == pytest.approx(0.005)
    assert all(torch.equal(p, q) for p, q in zip(params, snapshot[2], strict=True)) and not stop
    recipe.set_lr(1.5e-5)
    for epoch in range(5, 9):
        stop = recipe.on_epoch_end(model, epoch, 0.9, 0.1)
    assert stop and recipe.lr < 1e-5


def test_the_train_job_stores_a_base_with_provenance(store):
    base = make_base(store)
    meta = train_and_store_adapter(
        store, "robust", base=base.name, attack="pgd", data="digits", attack_options={"eps": 0.05, "steps": 2},
        config=TrainConfig(recipe="autolora", epochs=1, batch_size=16), r=2, limit=32, val_limit=8,
    )  # fmt: skip
    assert store.has_base("robust") and not store.has_adapter("robust")
    assert meta.origin["recipe"] == "autolora" and meta.origin["from_base"] == base.name
    assert meta.origin["recipe_config"]["recipe_options"]["rho"] == 0.75
    assert meta.fingerprint != base.fingerprint  # the feature extractor itself was trained
    before, after = store.load_base(base.name).state, store.load_base("robust").state
    moved = [k for k in before if k.endswith("running_mean") and not torch.equal(before[k], after[k])]
    assert moved  # BatchNorm runs in train mode for both threads; its statistics are part of the result
