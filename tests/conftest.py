"""Shared fixtures: real-data location, tiny timm models, and a temporary store."""

from pathlib import Path

import pytest
import torch

from benchmarks import REPO as REPO  # re-exported: tests start the CLI from this checkout
from benchmarks import data_root as data_path

torch.set_num_threads(min(2, torch.get_num_threads()))


def data_root() -> Path | None:
    """The real data folder (LORADAR_DATA, else ../shared/data beside the checkout), if it exists."""
    root = data_path()
    return root if root.is_dir() else None


@pytest.fixture
def real_data() -> Path:
    root = data_root()
    if root is None:
        pytest.skip("real data not found (set LORADAR_DATA)")
    return root


@pytest.fixture
def store(tmp_path: Path):
    from loradar_cli.store.store import Store

    return Store(tmp_path / "store")


def make_base(store, name: str = "tiny", model: str = "test_resnet", seed: int = 0, **kwargs):
    """A randomly initialised 1-channel 16×16 base saved in `store` (no training: fast)."""
    import timm

    from loradar_cli.models import weights_fingerprint
    from loradar_cli.store.meta import BaseMeta

    torch.manual_seed(seed)
    net = timm.create_model(model, num_classes=10, in_chans=1, **kwargs)
    for module in net.modules():  # timm zero-inits each block's last BN gamma: revive the residual branches
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    meta = BaseMeta(
        name=name,
        timm_model=model,
        model_kwargs=kwargs,
        num_classes=10,
        input_size=(1, 16, 16),
        mean=[0.3],
        std=[0.4],
        dataset="digits",
        fingerprint=weights_fingerprint(net.state_dict()),
    )
    store.save_base(meta, net.state_dict())
    return store.base_meta(name)


def make_adapter(store, base: str, name: str = "ad", targets: str | None = None, seed: int = 1, attack: str = "pgd"):
    """An adapter with random (non-zero) factors and head, saved in `store`."""
    from loradar_cli.jobs.train import lora_spec_for
    from loradar_cli.loading import build_model
    from loradar_cli.lora.inject import inject_lora, lora_layers
    from loradar_cli.lora.state import lora_state_dict
    from loradar_cli.store.meta import AdapterMeta

    stored = store.load_base(base)
    model = build_model(stored)
    spec = lora_spec_for(model, r=2, lora_alpha=4.0, targets=targets, train_head=True)
    torch.manual_seed(seed)
    inject_lora(model.model, spec)
    for layer in lora_layers(model.model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    torch.nn.init.normal_(model.model.get_submodule(spec.head).weight, std=0.2)
    meta = AdapterMeta(
        name=name,
        base=base,
        base_fingerprint=stored.meta.fingerprint,
        timm_model=stored.meta.timm_model,
        num_classes=10,
        lora=spec,
        recipe="loradar",
        attack=attack,
        metrics={"val_robust_acc": 0.5, "val_clean_acc": 0.9},
    )
    store.save_adapter(meta, lora_state_dict(model.model, spec))
    return store.adapter_meta(name), model


@pytest.fixture
def tiny(store):
    """(store, base meta, adapter meta, the adapted model used to write the adapter)."""
    base = make_base(store)
    adapter, model = make_adapter(store, base.name)
    return store, base, adapter, model
