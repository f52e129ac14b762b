"""Square: forward passes only, inside the threat model, and effective on a fitted model."""

import pytest
import torch
from torch import Tensor, nn

from loradar_cli.attacks import build_attack
from loradar_cli.attacks.square import meta_pseudo_gaussian, p_schedule

from .conftest import Digits


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        raise RuntimeError("backward called on a score-only model")


class ScoresOnly(nn.Module):
    """Wraps a model so that any backward pass through its input raises."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(_NoBackward.apply(x))


@pytest.mark.parametrize(("name", "eps"), [("square", 0.1), ("square-l2", 1.5)])
def test_square_uses_only_scores_stays_in_the_ball_and_lowers_accuracy(name: str, eps: float, digits: Digits) -> None:
    model = ScoresOnly(digits.model)
    x, y = digits.x[:100], digits.y[:100]
    with pytest.raises(RuntimeError, match="score-only"):
        build_attack("pgd", eps=eps, steps=1)(model, x, y)
    x_adv = build_attack(name, eps=eps, queries=300, seed=0)(model, x, y)
    delta = (x_adv - x).flatten(1)
    norms = delta.abs().amax(1) if name == "square" else delta.norm(dim=1)
    assert (norms <= eps + 1e-5).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean = (digits.model(x).argmax(1) == y).float().mean().item()
        robust = (digits.model(x_adv).argmax(1) == y).float().mean().item()
    assert robust < clean - 0.3, (clean, robust)


def test_square_keeps_the_best_so_fooled_points_stay_fooled(digits: Digits) -> None:
    x, y = digits.x[:60], digits.y[:60]
    few = build_attack("square", eps=0.1, queries=20, seed=3).until_fooled(digits.model, x, y)[1]
    many = build_attack("square", eps=0.1, queries=200, seed=3).until_fooled(digits.model, x, y)[1]
    assert (many | ~few).all() and many.sum() > few.sum()


def test_p_schedule_and_pattern_by_hand() -> None:
    # rescaled to 10,000 iterations: 5000 queries -> iteration 30 is 60 (p / 4), 600 is 1200 (p / 32)
    assert [p_schedule(0.8, it, 5000) for it in (0, 5, 6, 30, 600, 4500)] == [0.8, 0.8, 0.4, 0.2, 0.025, 0.8 / 512]
    pattern = meta_pseudo_gaussian(5, torch.zeros(1, dtype=torch.float64), flip=False)
    assert pattern.square().sum().item() == pytest.approx(1.0)
    # top half [2, 5]: rectangles around (1, 2) of weight 1, 1/4, 1/9 (the last one clipped to the rows)
    c, r, o = 1 + 1 / 4 + 1 / 9, 1 / 4 + 1 / 9, 1 / 9
    top = torch.tensor([[o, r, r, r, o], [o, r, c, r, o]], dtype=torch.float64)
    torch.testing.assert_close(pattern[:2] / pattern[1, 2], top / c)
    assert (pattern[2:] < 0).all() and pattern[3].argmin() == 2  # the negative bump below, centred on row 3
    torch.testing.assert_close(meta_pseudo_gaussian(5, torch.zeros(1, dtype=torch.float64), flip=True), pattern.T)
