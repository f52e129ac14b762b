"""evaluation.suite: suites from a registry, early stopping equal to attacking every point to the end."""

import pytest
import torch

from benchmarks import Counting
from loradar_cli.data import ImageData
from loradar_cli.errors import NotFoundError
from loradar_cli.evaluation import SUITES, evaluate_suite, run_suite, suite_attacks
from tests.attacks.conftest import Digits, fit_digits


@pytest.fixture(scope="module")
def digits() -> Digits:
    return fit_digits()


def test_suites_are_a_registry_with_autoattack_order() -> None:
    assert SUITES.names() == ["plus", "quick", "standard"]
    assert list(suite_attacks("quick", eps=0.1)) == ["pgd", "apgd-ce"]
    standard = suite_attacks("standard", eps=0.1, seed=3)
    assert list(standard) == ["apgd-ce", "apgd-t", "square"]
    assert [a.name for a in standard.values()] == ["apgd", "apgd-t", "square"]
    assert all(a.config.eps == 0.1 and a.config.seed == 3 for a in standard.values())
    assert list(suite_attacks("plus", eps=0.1)) == ["apgd-ce", "apgd-t", "square", "fab-t", "fgsm", "roa", "fia"]
    assert suite_attacks("plus", eps=0.1)["fab-t"].config.eps == 0.1
    assert [a.name for a in suite_attacks("standard", norm="l2", eps=0.5).values()] == [
        "apgd-l2",
        "apgd-t-l2",
        "square-l2",
    ]
    assert list(suite_attacks("plus", norm="l2")) == ["apgd-ce", "apgd-t", "square", "roa"]
    assert suite_attacks("plus", eps=0.1)["roa"].config.eps == 1.0, "the sticker keeps its own budget"
    with pytest.raises(NotFoundError, match="valid: plus, quick, standard"):
        suite_attacks("fast")


@pytest.mark.parametrize("suite", ["quick", "standard"])
def test_early_stopping_gives_the_robust_accuracy_of_attacking_every_point_to_the_end(
    suite: str, digits: Digits
) -> None:
    attacks = suite_attacks(suite, eps=0.08, seed=0, steps=15, overrides={"apgd-t": {"targets": 3}})
    stopped_model, full_model = Counting(digits.model), Counting(digits.model)
    stopped = run_suite(stopped_model, digits.x, digits.y, attacks, batch_size=64, early_stop=True)
    full = run_suite(full_model, digits.x, digits.y, attacks, batch_size=64, early_stop=False)
    assert torch.equal(stopped.clean, full.clean) and torch.equal(stopped.robust, full.robust)
    assert 0 < stopped.robust.sum() < stopped.clean.sum()
    # worst case by hand from the full run: clean and not broken by any attack
    by_hand = full.clean & ~torch.stack(list(full.fooled_by.values())).any(0)
    assert torch.equal(full.robust, by_hand)
    assert stopped_model.seen < full_model.seen / 2, "early stopping must save work"
    first, second = stopped.records[0], stopped.records[1]
    assert first.attacked == int(stopped.clean.sum()), "points misclassified clean are not attacked"
    assert second.attacked == first.attacked - first.fooled, "a later attack runs only on survivors"


def test_rows_record_the_threat_model_and_every_config(digits: Digits) -> None:
    data = ImageData(digits.x, digits.y, 10, "digits")
    attacks = suite_attacks("quick", eps=0.08, seed=1, steps=5)
    row = evaluate_suite(
        "mlp", digits.model, data, attacks, meta={"suite": "quick", "norm": "linf", "eps": 0.08, "seed": 1}
    )
    assert (row.suite, row.norm, row.eps, row.seed, row.n) == ("quick", "linf", 0.08, 1, len(digits.x))
    assert [r.attack["name"] for r in row.records] == ["pgd", "apgd"]
    assert row.records[1].attack["config"]["steps"] == 5 and row.records[1].attack["config"]["loss"] == "ce"
    assert row.worst_case == row.attacks["apgd-ce"] <= row.attacks["pgd"] <= row.clean
    with torch.no_grad():
        assert row.clean == pytest.approx((digits.model(digits.x).argmax(1) == digits.y).float().mean().item())
    assert row.flags == [], [f.id for f in row.flags]
