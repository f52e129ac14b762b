"""End to end on the real MNIST subset: a PGD adapter lifts PGD accuracy well above the base's."""

import pytest

from loradar_cli.recipes.loop import TrainConfig
from loradar_cli.workflows import evaluate_models, finetune_base, train_and_store_adapter

pytestmark = pytest.mark.slow


def test_pgd_adapter_beats_base_under_pgd_on_mnist(real_data, store):
    data = f"mnist:{real_data / 'mnist'}"
    finetune_base(store, "mnist-base", model="test_resnet", data=data, epochs=2, lr=3e-3, limit=3000, seed=0)
    attack = {"eps": 0.1, "alpha": 0.025, "steps": 7}
    train_and_store_adapter(store, "mnist-pgd", base="mnist-base", attack="pgd", data=data, attack_options=attack,
                            config=TrainConfig(epochs=3, lr=3e-3, seed=0), r=8, targets="convs", limit=2000,
                            val_limit=200)
    evaluation = {"eps": 0.1, "alpha": 0.01, "steps": 20}
    base_row, adapter_row = evaluate_models(store, base="mnist-base", adapters=[None, "mnist-pgd"], data=data,
                                            attacks={"pgd": evaluation}, limit=200)
    assert base_row.clean > 0.85 and adapter_row.clean > 0.8
    assert adapter_row.attacks["pgd"] > base_row.attacks["pgd"] + 0.25
