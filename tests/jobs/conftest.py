"""Shared fixtures of the merge, trim, vote, identify and fit-identifier job tests: random adapters, independent ΔW helpers."""

import pytest
import torch

from loradar_cli.loading import load_model
from loradar_cli.lora.layers import LoraLayer
from loradar_cli.lora.state import PEFT_PREFIX
from loradar_cli.store.store import Store
from tests.conftest import make_adapter, make_base

NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Store:
    """Base 'tiny' with random adapters a (pgd), b (fgsm), c (roa); base 'other' with adapter x."""
    store = Store(tmp_path_factory.mktemp("combine") / "store")
    make_base(store)
    for i, (name, attack) in enumerate(zip(NAMES, ("pgd", "fgsm", "roa"), strict=True)):
        make_adapter(store, "tiny", name, seed=i + 1, attack=attack)
    make_base(store, "other", seed=5)
    make_adapter(store, "other", "x", seed=6)
    make_adapter(store, "tiny", "half", targets="layer1.0.conv1", seed=7)
    return store


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def adv_files(pool, tmp_path_factory):
    """FGSM and PGD sets crafted against the base (small, fast)."""
    from loradar_cli.jobs.attack import craft_adv_set

    folder = tmp_path_factory.mktemp("sets")
    paths = []
    for attack, options in (("fgsm", {"eps": 0.3}), ("pgd", {"eps": 0.3, "steps": 3})):
        path = folder / f"{attack}.safetensors"
        craft_adv_set(pool, path, base="tiny", attack=attack, data="digits", attack_options=options, limit=24)
        paths.append(path)
    return paths


def delta_of(store: Store, name: str) -> dict[str, torch.Tensor]:
    """ΔW = alpha/r·B·A per layer, straight from the stored factors (independent of the library's helpers)."""
    adapter = store.load_adapter(name)
    spec = adapter.meta.lora
    out = {}
    for layer in spec.targets:
        a = adapter.tensors[f"{PEFT_PREFIX}{layer}.lora_A.weight"].double()
        b = adapter.tensors[f"{PEFT_PREFIX}{layer}.lora_B.weight"].double()
        out[layer] = (
            (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:]) * spec.alpha_of(layer) / spec.rank_of(layer)
        )
    return out


def head_of(store: Store, name: str | None) -> dict[str, torch.Tensor]:
    if name is None:
        state = store.load_base("tiny").state
        return {"weight": state["fc.weight"], "bias": state["fc.bias"]}
    tensors = store.load_adapter(name).tensors
    return {p: tensors[f"{PEFT_PREFIX}fc.{p}"] for p in ("weight", "bias")}


def base_plus(store: Store, deltas: dict[str, torch.Tensor], head: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The plain base model with ΔW added to its weights and the head replaced."""
    model = load_model(store, "tiny")
    with torch.no_grad():
        for layer, delta in deltas.items():
            weight = model.model.get_submodule(layer).weight
            weight.copy_((weight.double() + delta).float())
        model.model.fc.weight.copy_(head["weight"])
        model.model.fc.bias.copy_(head["bias"])
    return model


def effective_weight(model: torch.nn.Module, layer: str) -> torch.Tensor:
    module = model.model.get_submodule(layer)
    if isinstance(module, LoraLayer):
        return (module.base_layer.weight + module.delta_weight()).detach()
    return module.weight.detach()


@torch.no_grad()
def naive_probs(store: Store, names, x: torch.Tensor) -> torch.Tensor:
    """[K, N, C]: each adapter's unmerged LoRA model, one input at a time."""
    out = []
    for name in names:
        model = load_model(store, "tiny", name)
        out.append(torch.cat([model(x[i : i + 1]).softmax(-1) for i in range(len(x))]))
    return torch.stack(out)
