"""End to end on the real MNIST subset: adapters beat the base under attack; identification and votes work."""

import pytest

from loradar_cli.jobs.attack import craft_adv_set
from loradar_cli.jobs.evaluate import EnsembleRows, evaluate_models
from loradar_cli.jobs.finetune import finetune_base
from loradar_cli.jobs.train import train_and_store_adapter
from loradar_cli.recipes.loop import TrainConfig
from loradar_cli.store.store import Store
from tests.conftest import data_root

pytestmark = pytest.mark.slow

PGD_EVAL = {"eps": 0.1, "alpha": 0.01, "steps": 20}


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> tuple[Store, str]:
    """A store with a fitted MNIST base and two adapters trained against PGD and FGSM at eps 0.1."""
    root = data_root()
    if root is None:
        pytest.skip("real data not found (set LORADAR_DATA)")
    data = f"mnist:{root / 'mnist'}"
    store = Store(tmp_path_factory.mktemp("mnist") / "store")
    finetune_base(store, "mnist-base", model="test_resnet", data=data, epochs=2, lr=3e-3, limit=3000, seed=0)
    for name, attack, options in (
        ("mnist-pgd", "pgd", {"eps": 0.1, "alpha": 0.025, "steps": 7}),
        ("mnist-fgsm", "fgsm", {"eps": 0.1}),
    ):
        train_and_store_adapter(
            store,
            name,
            base="mnist-base",
            attack=attack,
            data=data,
            attack_options=options,
            config=TrainConfig(epochs=3, lr=3e-3, seed=0),
            r=8,
            targets="convs",
            limit=2000,
            val_limit=200,
        )
    return store, data


def test_pgd_adapter_beats_base_under_pgd_on_mnist(mnist):
    store, data = mnist
    base_row, adapter_row = evaluate_models(
        store, base="mnist-base", adapters=[None, "mnist-pgd"], data=data, attacks={"pgd": PGD_EVAL}, limit=200
    )
    assert base_row.clean > 0.85 and adapter_row.clean > 0.8
    assert adapter_row.attacks["pgd"] > base_row.attacks["pgd"] + 0.25


def test_votes_stay_robust_under_adaptive_attack_and_attacks_are_identified(mnist, tmp_path):
    """Votes attacked through the members' mean logits keep most of the adapters' robustness; the calibrated
    identifier, fitted on val sets, tells clean, PGD and FGSM inputs apart on held-out test sets."""
    from loradar_cli.jobs.fit_identifier import fit_identifier_from_sets
    from loradar_cli.jobs.identify import identify_sets

    store, data = mnist
    members = ["mnist-pgd", "mnist-fgsm"]
    base_row, *votes = evaluate_models(
        store,
        base="mnist-base",
        adapters=[None],
        data=data,
        attacks={"pgd": PGD_EVAL},
        limit=200,
        ensemble=EnsembleRows(members, ["majority", "soft"]),
    )
    assert [r.attacked for r in votes] == ["mean logits + soft vote"] * 2
    for row in votes:
        assert row.clean > 0.8 and row.attacks["pgd"] > base_row.attacks["pgd"] + 0.25
    sets = {}
    for split in ("val", "test"):
        for attack, options in (("pgd", PGD_EVAL), ("fgsm", {"eps": 0.1})):
            sets[split, attack] = tmp_path / f"{split}-{attack}.safetensors"
            craft_adv_set(
                store,
                sets[split, attack],
                base="mnist-base",
                attack=attack,
                data=data,
                split=split,
                attack_options=options,
                limit=150,
            )
    _, fitted = fit_identifier_from_sets(
        store,
        members,
        name="mnist-id",
        adv_sets=[sets["val", "pgd"], sets["val", "fgsm"]],
        data=data,
        split="val",
        limit=150,
    )
    report = identify_sets(
        store,
        [],
        mode="calibrated",
        identifier="mnist-id",
        data=data,
        limit=150,
        adv_sets=[sets["test", "pgd"], sets["test", "fgsm"]],
    )
    assert fitted.classes == ["clean", "fgsm", "pgd"]
    assert report.accuracy is not None and report.accuracy > 0.6  # chance is 1/3; measured 0.78
    assert min(row.accuracy or 0.0 for row in report.sets.values()) > 0.5  # measured: 0.69 or more per set


FIVE_WAY = {"pgd": PGD_EVAL, "fgsm": {"eps": 0.1}, "roa": {"steps": 10}, "fia": {"eps": 0.1, "steps": 5}}


def test_five_way_identification_on_held_out_test_sets(mnist, tmp_path):
    """The calibrated identifier, fitted on val sets of clean, PGD, FGSM, ROA and FIA inputs crafted against the
    base, names the family of held-out test inputs at least 85 % of the time (chance: 20 %)."""
    from loradar_cli.jobs.fit_identifier import fit_identifier_from_sets
    from loradar_cli.jobs.identify import identify_sets

    store, data = mnist
    sets = {}
    for split in ("val", "test"):
        for attack, options in FIVE_WAY.items():
            sets[split, attack] = tmp_path / f"{split}-{attack}.safetensors"
            craft_adv_set(
                store,
                sets[split, attack],
                base="mnist-base",
                attack=attack,
                data=data,
                split=split,
                attack_options=options,
                limit=100,
            )
    _, fitted = fit_identifier_from_sets(
        store,
        ["mnist-pgd", "mnist-fgsm"],
        name="mnist-id5",
        adv_sets=[sets["val", a] for a in FIVE_WAY],
        data=data,
        split="val",
        limit=100,
    )
    report = identify_sets(
        store, [], identifier="mnist-id5", data=data, limit=100, adv_sets=[sets["test", a] for a in FIVE_WAY]
    )
    assert fitted.classes == ["clean", "fgsm", "fia", "pgd", "roa"]
    assert report.accuracy is not None and report.accuracy >= 0.85
    assert report.confusion is not None and sum(map(sum, report.confusion.matrix)) == 500
