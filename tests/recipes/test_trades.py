"""TRADES' inner maximisation: stays in the ε-ball and [0, 1], raises the KL it maximises, reads the attack's budget."""

import pytest
import torch

from loradar_cli.attacks import build_attack
from loradar_cli.recipes.losses import kl_div
from loradar_cli.recipes.trades import inner_budget, kl_pgd


def test_kl_pgd_stays_in_the_ball_and_increases_the_kl():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5))
    x = torch.rand(16, 3, 4, 4)
    eps = 0.1
    x_adv = kl_pgd(model, x, eps, eps / 4, 10)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        start = kl_div(model(x), model((x + 0.001 * torch.randn_like(x)).clamp(0, 1))).mean()
        reached = kl_div(model(x), model(x_adv)).mean()
    assert reached > 100 * start  # ten ascent steps go far beyond the Gaussian start
    assert model.training  # the module's mode is restored


def test_inner_budget_reads_the_training_attack():
    assert inner_budget(build_attack("pgd", eps=0.3, alpha=0.01, steps=7)) == pytest.approx((0.3, 0.01, 7))
    assert inner_budget(build_attack("fgsm", eps=0.2)) == pytest.approx((0.2, 0.2, 1))
