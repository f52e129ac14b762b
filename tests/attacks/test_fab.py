"""FAB-T: the exact L-inf hyperplane projection against a linear program, parity with torchattacks' FAB."""

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from loradar_cli.attacks import build_attack
from loradar_cli.attacks.fab import project_hyperplane_linf
from loradar_cli.errors import InvalidValueError

from ._oracle import torchattacks
from .conftest import Digits


def smallest_linf_step(t: np.ndarray, w: np.ndarray, b: float) -> float | None:
    """min ||d||_inf s.t. w.(t + d) = b, 0 <= t + d <= 1, as a linear program over (d, s); None if infeasible."""
    n = len(t)
    bounds = [(-t[j], 1 - t[j]) for j in range(n)] + [(0, None)]
    rows = [np.r_[np.eye(n)[j], -1] for j in range(n)] + [np.r_[-np.eye(n)[j], -1] for j in range(n)]
    res = linprog(
        np.r_[np.zeros(n), 1], A_ub=rows, b_ub=np.zeros(2 * n), A_eq=[np.r_[w, 0]], b_eq=[b - w @ t], bounds=bounds
    )
    return res.fun if res.status == 0 else None


def test_projection_is_the_linear_programs_optimum() -> None:
    gen = torch.Generator().manual_seed(0)
    t, w = torch.rand(12, 9, generator=gen, dtype=torch.float64), torch.randn(12, 9, generator=gen, dtype=torch.float64)
    w[0, :4] = 0  # some coordinates do not matter
    b = (w * t).sum(1) + 0.6 * torch.randn(12, generator=gen, dtype=torch.float64)
    b[1] = (w[1] * t[1]).sum()  # already on the hyperplane: no step
    b[2] = w[2].clamp(min=0).sum() + 1.0  # out of the box's reach
    d = project_hyperplane_linf(t, w, b)
    z = t + d
    assert z.min() >= -1e-12 and z.max() <= 1 + 1e-12
    for i in range(len(t)):
        best = smallest_linf_step(t[i].numpy(), w[i].numpy(), b[i].item())
        if best is None:
            assert i == 2
            corner = torch.where(w[2] > 0, 1.0, 0.0).double()
            assert torch.allclose(z[2], torch.where(w[2] != 0, corner, t[2])), "as far as the box allows"
            continue
        assert (w[i] * z[i]).sum().item() == pytest.approx(b[i].item(), abs=1e-9)
        assert d[i].abs().max().item() == pytest.approx(best, abs=1e-9)
    assert d[1].abs().max() == 0 and (d[0, :4] == 0).all()


def test_fab_t_stays_in_the_ball_and_breaks_points_only_within_it(digits: Digits) -> None:
    eps = 0.06
    x_adv = build_attack("fab-t", eps=eps, steps=10, targets=3, seed=0)(digits.model, digits.x, digits.y)
    delta = (x_adv - digits.x).flatten(1).abs().amax(1)
    assert delta.max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        wrong = digits.model(x_adv).argmax(1) != digits.y
    clean_right = digits.model(digits.x).argmax(1) == digits.y
    assert (wrong & clean_right).sum() > 40, "the budget must break many points"
    assert (delta[~clean_right] == 0).all(), "points misclassified clean come back unchanged"
    assert (delta[~wrong] > 0).all(), "points not broken come back as their last iterate, inside the ball"


def test_fab_t_needs_three_classes(digits: Digits) -> None:
    two = torch.nn.Sequential(digits.model, torch.nn.Linear(10, 2))
    with pytest.raises(InvalidValueError, match="at least 3 classes"):
        build_attack("fab-t", eps=0.1)(two, digits.x[:4], torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize(("eps", "steps", "targets"), [(0.06, 10, 3), (0.1, 20, 9)])
def test_robust_accuracy_matches_torchattacks_fab_targeted(
    eps: float, steps: int, targets: int, digits: Digits
) -> None:
    """Within 1 point of torchattacks' multi-targeted L-inf FAB on 200 points, or lower."""
    ta = torchattacks()
    ours = digits.accuracy(
        build_attack("fab-t", eps=eps, steps=steps, targets=targets)(digits.model, digits.x, digits.y)
    )
    atk = ta.FAB(digits.model, norm="Linf", eps=eps, steps=steps, multi_targeted=True, n_classes=10, seed=0)
    atk.n_target_classes = targets
    theirs = digits.accuracy(atk(digits.x, digits.y))
    assert ours < digits.accuracy(digits.x) - 0.3, "the budget must make the comparison meaningful"
    assert ours <= theirs + 0.01, (ours, theirs)
