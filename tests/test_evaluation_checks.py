"""evaluation.checks: each sanity flag fires on a model built to trigger it and stays silent on a normal one."""

import pytest
import torch
from torch import Tensor, nn

from loradar_cli.advset import AdvSet
from loradar_cli.attacks import build_attack
from loradar_cli.data import ImageData
from loradar_cli.evaluation import AttackRecord, evaluate_suite, suite_attacks
from loradar_cli.evaluation.checks import (
    CHECK_QUERIES,
    CHECK_STEPS,
    EOT_SAMPLES,
    attack_cost,
    capped,
    check_monotone,
    check_results,
    eot_if_randomised,
    pre_checks,
    run_here,
)
from tests.attacks.conftest import Digits, InputNoise, fit_digits


@pytest.fixture(scope="module")
def digits() -> Digits:
    return fit_digits()


def ids(row) -> set[str]:
    return {f.id for f in row.flags}


class Noisy(nn.Module):
    """Random logits noise even in eval mode (a randomised defence)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        return logits + 3 * logits.std() * torch.randn_like(logits)


class Quantised(nn.Module):
    """Rounds inputs to 4 levels first: the input gradient is zero everywhere (masked), the decision is not robust."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(torch.round(x * 3) / 3)


class Corrector(nn.Module):
    """The fitted model near the clean points; farther than `radius` (L-inf) it answers the nearest point's label.

    A stand-in for a defence that only resists large perturbations: accuracy rises with eps and with steps.
    """

    def __init__(self, digits: Digits, radius: float) -> None:
        super().__init__()
        self.model, self.points, self.labels, self.radius = digits.model, digits.x.flatten(1), digits.y, radius

    def forward(self, x: Tensor) -> Tensor:
        dist = (x.flatten(1)[:, None] - self.points[None]).abs().amax(-1)  # [B, N]
        near, which = dist.min(1)
        far = nn.functional.one_hot(self.labels[which], 10).to(x.dtype) * 100
        return torch.where((near > self.radius)[:, None], far, self.model(x))


class Hardening(Corrector):
    """A defence that adapts as it is queried: after `after` forward passes it answers the nearest clean label."""

    def __init__(self, digits: Digits, after: int) -> None:
        super().__init__(digits, radius=-1.0)
        self.calls, self.after = 0, after

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return super().forward(x) if self.calls > self.after else self.model(x)


def test_a_normal_model_raises_no_flag(digits: Digits) -> None:
    data = ImageData(digits.x, digits.y, 10, "digits")
    row = evaluate_suite(
        "mlp",
        digits.model,
        data,
        suite_attacks("standard", eps=0.08, seed=0, steps=10, overrides={"square": {"queries": 200}}),
    )
    assert row.flags == [], [f.message for f in row.flags]
    assert row.worst_case < row.clean - 0.4


def test_randomised_model_is_flagged(digits: Digits) -> None:
    data = ImageData(digits.x[:64], digits.y[:64], 10, "digits")
    torch.manual_seed(0)
    row = evaluate_suite("noisy", Noisy(digits.model), data, suite_attacks("quick", eps=0.05, seed=0, steps=3))
    assert {"randomised", "eps-zero-not-clean"} <= ids(row)


def test_a_randomised_model_is_attacked_with_eot_and_the_flag_says_so(digits: Digits) -> None:
    data = ImageData(digits.x[:64], digits.y[:64], 10, "digits")
    attacks = suite_attacks("quick", eps=0.05, seed=0, steps=3)
    torch.manual_seed(0)
    noisy = evaluate_suite("noisy", InputNoise(digits.model, sigma=0.2), data, attacks)
    assert [r.attack["config"]["eot"] for r in noisy.records] == [EOT_SAMPLES, EOT_SAMPLES]
    (randomised,) = [f for f in noisy.flags if f.id == "randomised" and "EOT over" in f.message]
    assert f"EOT over {EOT_SAMPLES} passes: pgd, apgd-ce" in randomised.message
    plain = evaluate_suite("mlp", digits.model, data, attacks)
    assert [r.attack["config"]["eot"] for r in plain.records] == [1, 1] and "randomised" not in ids(plain)
    own = {"pgd": attacks["pgd"], "apgd-ce": build_attack("apgd", eps=0.05, steps=3, eot=4)}
    kept, _ = eot_if_randomised(InputNoise(digits.model, sigma=0.2), own, digits.x[:16])
    assert kept["apgd-ce"].config.eot == 4 and kept["pgd"].config.eot == EOT_SAMPLES, "an explicit count is kept"


def test_masked_gradients_are_flagged_by_zero_gradient_and_black_box(digits: Digits) -> None:
    data = ImageData(digits.x[:100], digits.y[:100], 10, "digits")
    model = Quantised(digits.model)
    attacks = suite_attacks(
        "standard", eps=0.2, seed=0, steps=5, overrides={"square": {"queries": 300}, "apgd-t": {"targets": 2}}
    )
    row = evaluate_suite("quantised", model, data, attacks)
    assert {"zero-gradient", "black-box-beats-white-box"} <= ids(row)
    assert row.attacks["apgd-t"] > row.worst_case + 0.5, "gradient attacks fail where Square does not"


def test_transfer_sets_against_white_box(digits: Digits) -> None:
    x, y = digits.x[:100], digits.y[:100]
    data = ImageData(x, y, 10, "digits")
    transfer = AdvSet(build_attack("pgd", eps=0.2, alpha=0.05, seed=0)(digits.model, x, y), y, "pgd", {})
    # a masked model: the transfer set from its unmasked twin breaks it, white-box gradient attacks do not
    masked = evaluate_suite(
        "quantised",
        Quantised(digits.model),
        data,
        suite_attacks("quick", eps=0.2, seed=0, steps=5),
        {"pgd@twin": transfer},
    )
    assert "transfer-beats-white-box" in ids(masked)
    # an ordinary model judged on a set crafted against another one: the set overstates robustness
    other = fit_digits_other(digits)
    weak = AdvSet(build_attack("fgsm", eps=0.1)(other, x, y), y, "fgsm", {})
    row = evaluate_suite(
        "mlp", digits.model, data, suite_attacks("quick", eps=0.1, seed=0, steps=10), {"fgsm@other": weak}
    )
    assert ids(row) == {"transfer-overstates"}, [f.message for f in row.flags]


def fit_digits_other(digits: Digits) -> nn.Module:
    """A second, independently initialised linear model on the same data (a different source model)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        nn.functional.cross_entropy(model(digits.x), digits.y).backward()
        opt.step()
    return model.eval()


def test_accuracy_rising_with_eps_and_steps_is_flagged(digits: Digits) -> None:
    x, y = digits.x[:64], digits.y[:64]
    rising_eps = Corrector(digits, radius=0.07)
    attack = build_attack("pgd", eps=0.1, alpha=0.025, steps=4, seed=0)
    assert {f.id for f in check_monotone(rising_eps, rising_eps, attack, "pgd", x, y)} >= {"accuracy-rises-with-eps"}
    hardening = Hardening(digits, after=8)  # eps/2 and eps runs (4 passes each) see the plain model
    short = build_attack("pgd", eps=0.1, alpha=0.025, steps=2, random_start=False)
    assert [f.id for f in check_monotone(hardening, hardening, short, "pgd", x, y)] == ["accuracy-rises-with-steps"]
    assert check_monotone(digits.model, digits.model, short, "pgd", x, y) == []


def test_too_few_classes_skips_dlr_attacks(digits: Digits) -> None:
    torch.manual_seed(0)
    three = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    data = ImageData(digits.x[:32], digits.y[:32] % 3, 3, "digits")
    row = evaluate_suite(
        "three",
        three,
        data,
        suite_attacks("standard", eps=0.05, seed=0, steps=3, overrides={"square": {"queries": 20}}),
    )
    assert "too-few-classes" in ids(row)
    assert [r.label for r in row.records] == ["apgd-ce", "square"]
    ten = evaluate_suite(
        "mlp",
        digits.model,
        ImageData(digits.x[:32], digits.y[:32], 10, "d"),
        suite_attacks("standard", eps=0.05, seed=0, steps=3, overrides={"square": {"queries": 20}}),
    )
    assert "too-few-classes" not in ids(ten)


def test_robust_above_clean_from_the_numbers() -> None:
    record = AttackRecord(
        label="pgd",
        attack={"name": "pgd"},
        target="white-box",
        attacked=10,
        fooled=0,
        unconfirmed=0,
        robust_after=0.9,
        seconds=0.0,
    )
    assert [f.id for f in check_results(0.8, 0.9, 100, [record], {}, {})] == ["robust-above-clean"]
    fine = record.model_copy(update={"robust_after": 0.5})
    assert check_results(0.8, 0.5, 100, [fine], {}, {}) == []


def test_square_alone_is_not_compared_with_gradient_attacks(digits: Digits) -> None:
    data = ImageData(digits.x[:40], digits.y[:40], 10, "digits")
    attacks = {"square": build_attack("square", eps=0.1, queries=100, seed=0)}
    row = evaluate_suite("mlp", digits.model, data, attacks)
    assert row.worst_case < row.clean and "black-box-beats-white-box" not in ids(row)


def test_pre_checks_hand_every_attack_run_to_the_runner_at_once_seeded_and_order_free(digits: Digits) -> None:
    """The runner gets all runs in one call (processes can share them); each run is seeded by its place, so running
    them in another order gives the same flags."""
    x, y = digits.x[:48], digits.y[:48]
    attacks = suite_attacks("standard", eps=0.1, seed=0, steps=30, overrides={"square": {"queries": 500}})
    batches = []

    def backwards(probes):
        batches.append(list(probes))
        return run_here(list(probes)[::-1])[::-1]

    flags = pre_checks(digits.model, {"white-box": digits.model}, attacks, x, y, run=backwards)
    (probes,) = batches
    assert len(probes) == 1 + len(attacks) + 3  # gradients, eps = 0 per attack, eps/2 + eps + twice the steps
    assert [p.seed for p in probes] == list(range(len(probes)))
    assert probes[-1].cost == 2 * probes[-2].cost > 0  # twice the (capped) steps costs twice as much
    assert flags == pre_checks(digits.model, {"white-box": digits.model}, attacks, x, y) == []


def test_check_attacks_are_capped_and_costed_in_passes_per_point() -> None:
    square = build_attack("square", eps=0.1, queries=5000)
    pgd = build_attack("pgd", eps=0.1, steps=10)
    assert (capped(square, eps=0.0).config.queries, capped(square, eps=0.0).config.eps) == (CHECK_QUERIES, 0.0)
    assert capped(pgd).config.steps == 10 and capped(build_attack("pgd", steps=50)).config.steps == CHECK_STEPS
    assert attack_cost(pgd) == 30 and attack_cost(capped(square)) == CHECK_QUERIES
    apgd_t = build_attack("apgd-t", eps=0.1, steps=10)
    assert attack_cost(apgd_t) == 30 * apgd_t.config.targets * apgd_t.config.restarts
