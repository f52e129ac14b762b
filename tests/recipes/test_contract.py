"""Every registered recipe: one training step on a tiny model, then the stored adapter reloads exactly."""

import pytest
import torch

from loradar_cli.attacks import build_attack
from loradar_cli.data import load_data
from loradar_cli.jobs.train import lora_spec_for
from loradar_cli.loading import build_model, load_model
from loradar_cli.lora.init import LORA_INITS, init_lora
from loradar_cli.lora.inject import inject_lora
from loradar_cli.lora.state import base_state, stored_deltas
from loradar_cli.names import LORA_INITS as LORA_INIT_NAMES
from loradar_cli.names import RECIPES as RECIPE_NAMES
from loradar_cli.recipes import RECIPES, build_recipe
from loradar_cli.recipes.loop import TrainConfig, train_adapter
from loradar_cli.store.meta import AdapterMeta
from tests.conftest import make_base


def test_torch_free_names_equal_the_registries():
    assert tuple(RECIPES.names()) == RECIPE_NAMES
    assert tuple(LORA_INITS.names()) == LORA_INIT_NAMES


@pytest.mark.parametrize("name", RECIPES.names())
def test_recipe_trains_one_step_and_reloads_exactly(store, name):
    base = make_base(store)
    model = build_model(store.load_base(base.name))
    spec = lora_spec_for(model, r=2, lora_alpha=None, targets=None, train_head=True)
    recipe = build_recipe(name)
    torch.manual_seed(0)
    init_lora(inject_lora(model.model, spec), recipe.lora_init)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    if recipe.output == "base":  # the whole model trains; what must not move is checked on the stored base
        frozen = {}
    data = load_data("digits", "train", limit=8, channels=1, size=16)
    attack = build_attack("pgd", eps=0.1, alpha=0.05, steps=2)
    config = TrainConfig(recipe=name, epochs=1, batch_size=8, lr=1e-2, select="last")
    result = train_adapter(model, attack, data, data, config, recipe=recipe)

    assert torch.isfinite(torch.tensor(result.history[0].loss))
    after = dict(model.named_parameters())
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)  # nothing outside LoRA and head moved
    x = load_data("digits", "test", limit=16, channels=1, size=16).x
    if recipe.output == "base":
        _check_base_output(store, base, model, recipe, x)
        return
    exports = recipe.export(model, spec)
    assert set(exports) == set(recipe.output_suffixes)
    for suffix, out in exports.items():
        meta = AdapterMeta(
            name=f"c-{name}{suffix}",
            base=base.name,
            base_fingerprint=base.fingerprint,
            timm_model=base.timm_model,
            num_classes=10,
            lora=out.spec,
            recipe=name,
        )
        store.save_adapter(meta, out.tensors)
    main = exports[""]
    assert any(d.abs().sum() > 0 for d in stored_deltas(main.spec, main.tensors).values())  # it trained
    with recipe.inference(model):  # the model as deployed is what the main adapter stores
        assert torch.equal(model.eval()(x), load_model(store, base.name, f"c-{name}")(x))
        _check_peft_loads(store, base.name, f"c-{name}", model, x)


def _check_base_output(store, base, model, recipe, x) -> None:
    """A full-model recipe: the stored base, rebuilt from its own weights, is the trained model as deployed."""
    meta = base.model_copy(update={"name": "out", "fingerprint": ""})
    store.save_base(meta, base_state(model.model))
    rebuilt = build_model(store.load_base("out"))
    with recipe.inference(model), torch.no_grad():
        assert torch.equal(model.eval()(x), rebuilt(x))
        assert not torch.equal(rebuilt(x), build_model(store.load_base(base.name))(x))  # it trained


def _check_peft_loads(store, base: str, adapter: str, model, x) -> None:
    """PEFT, on the plain timm base, reproduces the trained model (the stored adapter is a plain LoRA)."""
    try:
        import peft
    except ImportError:
        return
    import timm

    net = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    net.load_state_dict(store.load_base(base).state)
    theirs = peft.PeftModel.from_pretrained(net, str(store.adapter_dir(adapter))).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(model.normalize(x)), model(x), rtol=1e-5, atol=1e-5)
