import pytest
import torch

from loradar_cli.attacks import build_attack
from loradar_cli.data import load_data
from loradar_cli.jobs.train import lora_spec_for, train_and_store_adapter
from loradar_cli.loading import build_model, load_model
from loradar_cli.lora.inject import inject_lora, lora_layers, lora_state_dict
from loradar_cli.recipes.loop import TrainConfig, train_adapter
from loradar_cli.recipes.losses import RECIPES, loradar_loss, pgd_at_loss
from loradar_cli.store.meta import AdapterMeta
from tests.conftest import make_base


def test_train_then_reload_on_fresh_base_gives_identical_logits(store):
    base = make_base(store)
    stored = store.load_base(base.name)
    model = build_model(stored)
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    spec = lora_spec_for(model, r=2, lora_alpha=None, targets=None, train_head=True)
    inject_lora(model.model, spec)
    train = load_data("digits", "train", limit=64, channels=1, size=16)
    val = load_data("digits", "val", limit=32, channels=1, size=16)
    result = train_adapter(
        model, build_attack("fgsm", eps=0.05), train, val, TrainConfig(epochs=2, batch_size=32, lr=1e-2), None
    )
    assert len(result.history) == 2 and 1 <= result.best_epoch <= 2
    assert any(layer.lora_B.weight.abs().sum() > 0 for layer in lora_layers(model.model).values())
    bn_after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(bn_before[k], bn_after[k]) for k in bn_before)  # BatchNorm statistics stay frozen

    meta = AdapterMeta(
        name="trained",
        base=base.name,
        base_fingerprint=base.fingerprint,
        timm_model=base.timm_model,
        num_classes=10,
        lora=spec,
    )
    store.save_adapter(meta, lora_state_dict(model.model, spec))
    reloaded = load_model(store, base.name, "trained")
    x = load_data("digits", "test", limit=16, channels=1, size=16).x
    assert torch.equal(model.eval()(x), reloaded(x))


def test_recipe_losses_against_hand_computation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, x_adv, y = torch.rand(5, 1, 2, 2), torch.rand(5, 1, 2, 2), torch.randint(0, 3, (5,))
    ce = torch.nn.functional.cross_entropy
    loss, _ = loradar_loss(model, x, x_adv, y)
    torch.testing.assert_close(loss, (ce(model(x), y) + ce(model(x_adv), y)) / 2)
    loss, _ = pgd_at_loss(model, x, x_adv, y)
    torch.testing.assert_close(loss, ce(model(x_adv), y))
    assert RECIPES.names() == ["loradar", "pgd-at"]


def test_train_workflow_records_provenance_and_static_mode(store):
    base = make_base(store)
    meta = train_and_store_adapter(
        store,
        "static",
        base=base.name,
        attack="fgsm",
        data="digits",
        attack_options={"eps": 0.05},
        limit=32,
        val_limit=16,
        config=TrainConfig(epochs=1, batch_size=16, static_attack=True),
    )
    assert meta.attack == "fgsm" and meta.attack_config["config"]["eps"] == pytest.approx(0.05)
    assert meta.recipe_config["static_attack"] is True
    assert 0.0 <= meta.metrics["val_robust_acc"] <= 1.0
    assert meta.lora.targets == [f"layer{i}.0.conv1" for i in range(1, 5)]


def _pick(history: list[tuple[float, float]], select: str, min_clean: float = 0.0) -> int:
    """Epoch (1-based) the selection keeps for a history of (val clean, val robust)."""
    from loradar_cli.recipes.loop import EpochStats, TrainResult, _is_better

    result = TrainResult(best_epoch=0)
    for epoch, (clean, robust) in enumerate(history, start=1):
        result.history.append(EpochStats(epoch, 0.0, clean, robust))
        if _is_better(result.history[-1], result, select, min_clean):
            result.best_epoch = epoch
    return result.best_epoch


def test_best_epoch_selection_and_the_clean_floor():
    history = [(0.95, 0.40), (0.90, 0.55), (0.15, 0.14 + 0.5)]  # the last epoch is near-constant yet "robust"
    assert _pick(history, "robust") == 3
    assert _pick(history, "robust", min_clean=0.8) == 2
    assert _pick(history, "clean") == 1 and _pick(history, "last") == 3
    assert _pick([(0.5, 0.3), (0.6, 0.2)], "robust", min_clean=0.9) == 1  # nothing clears the floor: plain robust
