"""HyperAT: the hypernetwork starts at ΔW = 0, every defence is sampled, and the stored merge is the
validation-chosen weighted sum of the per-defence adapters."""

import pytest
import torch

from loradar_cli.attacks import build_attack
from loradar_cli.data import load_data
from loradar_cli.jobs.train import lora_spec_for, train_and_store_adapter
from loradar_cli.loading import build_model
from loradar_cli.lora.inject import inject_lora
from loradar_cli.lora.state import stored_deltas
from loradar_cli.recipes import build_recipe
from loradar_cli.recipes.hyperat import DEFENCES, MERGE_GRID, generated
from loradar_cli.recipes.loop import TrainConfig, adapter_train_mode
from tests.conftest import make_base


@pytest.fixture
def prepared(store):
    base = make_base(store)
    model = build_model(store.load_base(base.name))
    inject_lora(model.model, lora_spec_for(model, r=2, lora_alpha=None, targets=None, train_head=True))
    data = load_data("digits", "train", limit=16, channels=1, size=16)
    recipe = build_recipe("hyperat")
    torch.manual_seed(0)
    recipe.prepare(model, data, data, build_attack("fgsm", eps=0.05))
    return build_model(store.load_base(base.name)), model, recipe, data


def test_the_hypernetwork_starts_at_zero_delta_for_every_defence(prepared):
    plain, model, recipe, data = prepared
    for factors in recipe.per_defence(model):
        assert all(torch.count_nonzero(b) == 0 for _, b in factors) and all(a.abs().sum() > 0 for a, _ in factors)
        with generated(recipe._layers, factors), torch.no_grad():
            assert torch.equal(model(data.x), plain(data.x))


def test_steps_sample_every_defence_and_train_the_shared_hypernetwork(prepared):
    _, model, recipe, data = prepared
    net = model.get_submodule("hypernetwork")
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    seen = set()
    for _ in range(12):
        adapter_train_mode(model)
        out = recipe.step(model, data.x, data.y, build_attack("fgsm", eps=0.05))
        seen.add(DEFENCES[int(out.metrics["defence"])])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert seen == set(DEFENCES)
    assert all(any(torch.count_nonzero(b) for _, b in f) for f in recipe.per_defence(model))


def test_stored_merge_is_the_best_weighted_sum_of_the_defence_adapters(store):
    base = make_base(store)
    config = TrainConfig(recipe="hyperat", epochs=1, batch_size=8, lr=1e-2, seed=0)
    meta = train_and_store_adapter(
        store, "h", base=base.name, attack="pgd", data="digits", attack_options={"eps": 0.05, "steps": 2},
        config=config, r=2, limit=16, val_limit=16,
    )  # fmt: skip
    assert meta.parents == [f"h-{d}" for d in DEFENCES]
    scores = meta.combination["merge_scores"]
    weights = meta.combination["merge_weights"]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    assert tuple(weights[d] for d in DEFENCES) == MERGE_GRID[best]
    merged = stored_deltas(meta.lora, store.load_adapter("h").tensors)
    members = [store.load_adapter(f"h-{d}") for d in DEFENCES]
    for layer, delta in merged.items():
        expected = sum(
            weights[d] * stored_deltas(m.meta.lora, m.tensors)[layer] for d, m in zip(DEFENCES, members, strict=True)
        )
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-7)
