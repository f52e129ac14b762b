import pytest
import torch

from loradar_cli.attacks import build_attack
from loradar_cli.data import load_data
from loradar_cli.jobs.train import lora_spec_for, train_and_store_adapter
from loradar_cli.loading import build_model, load_model
from loradar_cli.lora.inject import inject_lora, lora_layers
from loradar_cli.lora.state import lora_state_dict
from loradar_cli.recipes.base import Recipe, StepOutput
from loradar_cli.recipes.loop import EpochStats, TrainConfig, is_better, train_adapter
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


class _Scripted(Recipe):
    """A recipe whose factor values are set per epoch (so each epoch's weights are known) and whose validation
    accuracies the test dictates through a model wrapper."""

    name = "scripted"

    def __init__(self, values):
        super().__init__()
        self.values = values

    def on_epoch_start(self, model, epoch):
        with torch.no_grad():
            for layer in lora_layers(model.model).values():
                layer.lora_B.weight.fill_(self.values[epoch - 1])

    def step(self, model, x, y, attack):
        logits = model(x)
        return StepOutput(logits.sum() * 0.0, logits)


def _run_selection(store, history, select, min_clean=0.0):
    """Train 3 epochs through train_adapter with scripted val accuracies; (best_epoch, B value kept in the model)."""
    import loradar_cli.recipes.loop as loop

    base = store.base_meta("tiny") if store.has_base("tiny") else make_base(store)
    model = build_model(store.load_base(base.name))
    inject_lora(model.model, lora_spec_for(model, r=2, lora_alpha=None, targets=None, train_head=False))
    data = load_data("digits", "train", limit=8, channels=1, size=16)
    accs = iter(history)
    original = loop.validate
    loop.validate = lambda *args, **kwargs: next(accs)  # (val clean, val robust) of each epoch, scripted
    try:
        values = [0.1 * (e + 1) for e in range(len(history))]
        config = TrainConfig(epochs=len(history), batch_size=8, select=select, min_clean=min_clean)
        result = train_adapter(model, build_attack("fgsm", eps=0.0), data, data, config, recipe=_Scripted(values))
    finally:
        loop.validate = original
    kept = next(iter(lora_layers(model.model).values())).lora_B.weight.flatten()[0].item()
    return result.best_epoch, round(kept, 6)


def test_best_epoch_selection_through_the_loop(store):
    history = [(0.95, 0.40), (0.90, 0.55), (0.15, 0.64)]  # the last epoch is near-constant yet "robust"
    assert _run_selection(store, history, "robust") == (3, 0.3)
    assert _run_selection(store, history, "robust", min_clean=0.8) == (2, 0.2)
    assert _run_selection(store, history, "clean") == (1, 0.1)
    assert _run_selection(store, history, "last") == (3, 0.3)
    assert _run_selection(store, [(0.5, 0.3), (0.6, 0.2)], "robust", min_clean=0.9)[0] == 1  # no epoch clears it


@pytest.mark.parametrize(
    ("stats", "best", "select", "min_clean", "expected"),
    [
        ((0.9, 0.5), None, "robust", 0.0, True),  # first epoch always wins
        ((0.9, 0.5), (0.9, 0.5), "robust", 0.0, False),  # ties keep the earlier epoch
        ((0.5, 0.6), (0.9, 0.5), "robust", 0.0, True),
        ((0.5, 0.6), (0.9, 0.5), "robust", 0.8, False),  # below the clean floor ranks last
        ((0.9, 0.1), (0.8, 0.9), "clean", 0.0, True),
        ((0.1, 0.1), (0.9, 0.9), "last", 0.0, True),
    ],
)
def test_is_better_table(stats, best, select, min_clean, expected):
    wrap = lambda s: None if s is None else EpochStats(1, 0.0, *s)  # noqa: E731
    assert is_better(wrap(stats), wrap(best), select, min_clean) is expected
