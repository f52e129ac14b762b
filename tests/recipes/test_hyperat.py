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


@pytest.mark.parametrize(("scale", "expected"), [(None, 1 / 256), (0.5, 0.5)])
def test_the_hypernetwork_learns_at_the_fan_in_scaled_rate(prepared, scale, expected):
    """Every trainable parameter is optimised once: the hypernetwork's at lr x scale, the classifier head's at lr."""
    _, model, recipe, _ = prepared
    recipe.config = recipe.config.model_copy(update={"hyper_lr_scale": scale})
    hyper = {id(p) for p in model.get_submodule("hypernetwork").parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert any(id(p) not in hyper for p in params), "the classifier head trains too"
    optimizer, _ = recipe.build_optimizer(params, 1e-3, 10, 0.1)
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, grouped)) == sorted(map(id, params))
    for group in optimizer.param_groups:
        rate = 1e-3 * expected if id(group["params"][0]) in hyper else 1e-3
        assert group["lr"] == pytest.approx(rate) and all((id(p) in hyper) == (rate != 1e-3) for p in group["params"])


def test_generated_factors_move_like_a_direct_lora_under_the_scaled_rate(prepared):
    """One Adam step at lr moves each generated A by about lr (not lr x hidden): the point of the scaling."""
    _, model, recipe, _ = prepared
    net = model.get_submodule("hypernetwork")
    params = [p for p in net.parameters() if p.requires_grad]
    moves = {}
    for scale in (1.0, None):
        recipe.config = recipe.config.model_copy(update={"hyper_lr_scale": scale})
        state = {k: v.clone() for k, v in net.state_dict().items()}
        before = [a.clone() for a, _ in recipe.per_defence(model)[0]]
        optimizer, _ = recipe.build_optimizer(params, 1e-3, 10, 0.1)
        loss = sum(a.sum() for a, _ in net(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after = [a for a, _ in recipe.per_defence(model)[0]]
        moves[scale] = max((x - y).abs().max().item() for x, y in zip(after, before, strict=True))
        net.load_state_dict(state)
    assert moves[None] < 0.1 * moves[1.0]
    assert 1e-4 < moves[None] < 3e-3, moves  # about lr = 1e-3, as a LoRA factor trained directly
