"""TRADES and MART losses against a hand computation on fixed logits (plain Python floats, no torch maths)."""

import math

import pytest
import torch

from loradar_cli.recipes.losses import boosted_ce, kl_div, mart_loss, trades_loss

CLEAN = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-1.0, 3.0, 0.5]]
ADV = [[1.0, 1.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 1.0]]
Y = [0, 1, 1]


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def _tensors():
    return torch.tensor(CLEAN, dtype=torch.float64), torch.tensor(ADV, dtype=torch.float64), torch.tensor(Y)


@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
def test_trades_loss_matches_hand_computation(beta):
    expected = 0.0
    for z, za, y in zip(CLEAN, ADV, Y, strict=True):
        p, q = _softmax(z), _softmax(za)
        expected += (-math.log(p[y]) + beta * _kl(p, q)) / len(Y)
    assert trades_loss(*_tensors(), beta=beta).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("lam", [0.0, 5.0, 6.0])
def test_mart_loss_matches_hand_computation(lam):
    expected = 0.0
    for z, za, y in zip(CLEAN, ADV, Y, strict=True):
        p, q = _softmax(z), _softmax(za)
        wrong = max(q[k] for k in range(3) if k != y)
        bce = -math.log(q[y]) - math.log(1.0001 - wrong)
        expected += (bce + lam * _kl(p, q) * (1.0000001 - p[y])) / len(Y)
    assert mart_loss(*_tensors(), lam=lam).item() == pytest.approx(expected, rel=1e-12)


def test_kl_is_zero_on_equal_logits_and_boosted_ce_uses_the_strongest_wrong_class():
    clean, adv, y = _tensors()
    assert torch.allclose(kl_div(clean, clean), torch.zeros(3, dtype=torch.float64))
    # sample 2 (y = 1): the adversarial argmax is class 0, so the boost is -log(1.0001 - q_0)
    q = _softmax(ADV[2])
    assert boosted_ce(adv, y)[2].item() == pytest.approx(-math.log(q[1]) - math.log(1.0001 - q[0]), rel=1e-12)


def test_trades_gradient_flows_through_the_clean_distribution():
    clean, adv, y = _tensors()
    clean.requires_grad_(True)
    trades_loss(torch.zeros_like(clean) + clean, adv, y, beta=6.0).backward()
    ce_only = torch.autograd.grad(torch.nn.functional.cross_entropy(clean, y), clean)[0]
    assert not torch.allclose(clean.grad, ce_only)  # p(x) is not detached in the KL term
