"""APGD: the step-size schedule against a hand-written reference, DLR on hand-computed logits, parity."""

import math

import pytest
import torch
from torch import nn

from loradar_cli.attacks import build_attack
from loradar_cli.attacks._functional import dlr, dlr_targeted
from loradar_cli.attacks.apgd import StepSchedule, checkpoints
from loradar_cli.errors import InvalidValueError

from ._oracle import torchattacks
from .conftest import Digits, InputNoise, expected_accuracy


def paper_checkpoints(n: int) -> list[int]:
    """w_j = ceil(p_j N) with p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return [math.ceil(round(q * n, 9)) for q in p[1:]]


def reference_etas(losses: list[float], loss0: float, n: int, eta0: float, rho: float = 0.75) -> list[float]:
    """Step size after each of the scripted iterates of one point, by the rules of Croce & Hein (2020), Alg. 1."""
    marks = set(checkpoints_by_windows(n))
    history = [loss0]  # loss of x^(0), x^(1), ...
    eta, etas, last_mark = eta0, [], 0
    halved_before, best_at_last = True, loss0
    for k, loss in enumerate(losses, start=1):
        history.append(loss)
        if k in marks:
            window = k - last_mark
            rises = sum(history[i + 1] > history[i] for i in range(last_mark, k))
            best = max(history)
            halve = rises <= rho * window or (not halved_before and best_at_last >= best)
            eta = eta / 2 if halve else eta
            halved_before, best_at_last, last_mark = halve, best, k
        etas.append(eta)
    return etas


def checkpoints_by_windows(n: int) -> list[int]:
    """The reference code's integer windows: floor(0.22 N), each next floor(0.03 N) shorter, >= floor(0.06 N)."""
    marks, window, at = [], max(n * 22 // 100, 1), 0
    while at + window <= n:
        at += window
        marks.append(at)
        window = max(window - max(n * 3 // 100, 1), max(n * 6 // 100, 1))
    return marks


def test_checkpoints_follow_the_paper_for_100_steps() -> None:
    assert checkpoints(100) == paper_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(50) == checkpoints_by_windows(50)


def scripted_losses(n: int) -> torch.Tensor:
    """[n, 4]: rising every step; flat; rising in 3 of 4 steps; rising then flat (improves, then stalls)."""
    steps = torch.arange(1, n + 1, dtype=torch.float64)
    rising = steps
    flat = torch.zeros(n, dtype=torch.float64)
    three_of_four = steps - 2.5 * (steps % 4 == 0)  # one drop in four steps: about rho of the steps rise
    plateau = torch.minimum(steps, torch.tensor(30.0, dtype=torch.float64))
    return torch.stack([rising, flat, three_of_four, plateau], dim=1)


@pytest.mark.parametrize("n", [100, 50])
def test_step_size_halves_at_checkpoints_like_the_reference(n: int) -> None:
    losses = scripted_losses(n)
    loss0 = torch.zeros(4, dtype=torch.float64)
    sched = StepSchedule(n, torch.full((4,), 0.5, dtype=torch.float64), loss0, 0.75)
    ours = []
    for loss in losses:
        sched.update(loss)
        ours.append(sched.eta.tolist())
    for point in range(4):
        expected = reference_etas(losses[:, point].tolist(), 0.0, n, 0.5)
        assert [e[point] for e in ours] == expected, point
    final = ours[-1]
    assert final[0] == 0.5 and final[1] == 0.5 / 2 ** len(checkpoints(n)), "rising never halves, flat always does"
    assert final[1] < final[2] < 0.5 and final[3] < 0.5


def test_dlr_on_hand_computed_logits() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0], [0.5, 4.0, 1.0, 2.0]])
    y = torch.tensor([0, 1, 1])
    # sorted: 3 > 2 > 1 > 0, so z_pi1 - z_pi3 = 2; third row: 4 > 2 > 1, gap 3
    expected = torch.tensor([-(3 - 2) / 2, -(1 - 3) / 2, -(4 - 2) / 3])
    torch.testing.assert_close(dlr(logits, y), expected)
    torch.testing.assert_close(dlr(logits * 3 + 7, y), expected)  # shift- and scale-invariant
    target = torch.tensor([3, 2, 0])
    # denominator z_pi1 - (z_pi3 + z_pi4) / 2: rows 1-2: 3 - (1 + 0) / 2 = 2.5; row 3: 4 - (1 + 0.5) / 2 = 3.25
    expected_t = torch.tensor([-(3 - 0) / 2.5, -(1 - 2) / 2.5, -(4 - 0.5) / 3.25])
    torch.testing.assert_close(dlr_targeted(logits, y, target), expected_t)


def test_dlr_needs_enough_classes(digits: Digits) -> None:
    three = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    x, y = digits.x[:4], digits.y[:4] % 3
    with pytest.raises(InvalidValueError, match="at least 4 classes"):
        build_attack("apgd-t", steps=2)(three, x, y)
    build_attack("apgd", loss="dlr", steps=2)(three, x, y)  # 3 classes suffice untargeted
    with pytest.raises(InvalidValueError, match="at least 3 classes"):
        build_attack("apgd", loss="dlr", steps=2)(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), x, y % 2)


@pytest.mark.parametrize("name", ["apgd", "apgd-l2", "apgd-t"])
def test_apgd_collapses_accuracy_below_pgd_at_equal_cost(name: str, digits: Digits) -> None:
    eps = 0.6 if name.endswith("l2") else 0.08
    x, y = digits.x, digits.y
    options = {"targets": 3} if name == "apgd-t" else {}
    apgd = digits.accuracy(build_attack(name, eps=eps, steps=20, seed=0, **options)(digits.model, x, y))
    pgd_name = "pgd-l2" if name.endswith("l2") else "pgd"
    pgd = digits.accuracy(build_attack(pgd_name, eps=eps, alpha=eps / 4, steps=20, seed=0)(digits.model, x, y))
    assert apgd <= pgd + 0.01
    assert apgd < digits.accuracy(x) - 0.4


@pytest.mark.parametrize(("loss", "seeds"), [("ce", 1), ("dlr", 3)])
def test_robust_accuracy_matches_torchattacks_apgd(loss: str, seeds: int, digits: Digits) -> None:
    """Within 1 point of torchattacks' APGD or lower (DLR's spread over random starts is larger: mean of 3)."""
    ta = torchattacks()
    eps, steps = 0.1, 20
    ours = sum(
        digits.accuracy(build_attack("apgd", eps=eps, steps=steps, loss=loss, seed=s)(digits.model, digits.x, digits.y))
        for s in range(seeds)
    )
    theirs = sum(
        digits.accuracy(ta.APGD(digits.model, eps=eps, steps=steps, loss=loss, seed=s)(digits.x, digits.y))
        for s in range(seeds)
    )
    assert ours / seeds < digits.accuracy(digits.x) - 0.5, "the budget must make the comparison meaningful"
    assert ours / seeds <= theirs / seeds + 0.01, (ours / seeds, theirs / seeds)


def test_robust_accuracy_matches_torchattacks_apgd_targeted(digits: Digits) -> None:
    ta = torchattacks()
    eps, steps = 0.06, 10
    ours = digits.accuracy(
        build_attack("apgd-t", eps=eps, steps=steps, targets=3, seed=0)(digits.model, digits.x, digits.y)
    )
    atk = ta.APGDT(digits.model, eps=eps, steps=steps, n_classes=10, seed=0)
    atk.n_target_classes = 3
    theirs = digits.accuracy(atk(digits.x, digits.y))
    assert ours <= theirs + 0.01, (ours, theirs)


def test_eot_lowers_robust_accuracy_of_a_randomised_model(digits: Digits) -> None:
    """Athalye et al. (arXiv:1802.00420): against input noise, averaged gradients find stronger examples."""
    model = InputNoise(digits.model, sigma=0.2)
    accuracy = {}
    for eot in (1, 10):
        torch.manual_seed(0)  # the model's noise
        x_adv = build_attack("apgd", eps=0.06, steps=10, seed=0, eot=eot)(model, digits.x, digits.y)
        assert (x_adv - digits.x).abs().amax() <= 0.06 + 1e-6
        accuracy[eot] = expected_accuracy(model, x_adv, digits.y)
    assert accuracy[10] < accuracy[1] - 0.05, accuracy
