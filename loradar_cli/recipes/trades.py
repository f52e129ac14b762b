"""TRADES: clean CE plus β times the KL divergence between clean and adversarial predictions.

Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan, "Theoretically Principled Trade-off between Robustness and
Accuracy", ICML 2019, arXiv:1901.08573. Threat model: L-inf ball of the training attack's eps.
[paper] L = CE(f(x), y) + β·max_{x' ∈ B_ε(x)} KL(p(x) ‖ p(x')), β = 6 in the CIFAR-10 experiments.
[code] inner maximisation: start at x + 0.001·N(0, I), sign-gradient ascent on KL(p(x) ‖ p(x')) with the
model in eval mode, projected onto the ε-ball and [0, 1]; p(x) keeps its gradient in the outer loss.
Here eps, alpha and steps come from the training attack's config (`--eps/--alpha/--steps`); `inner=attack`
uses the training attack itself (CE objective) as the inner maximisation instead.
"""

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from loradar_cli.attacks._functional import grad_wrt, project_linf
from loradar_cli.metrics import model_mode
from loradar_cli.recipes.base import AttackFn, Recipe, RecipeConfig, StepOutput, register_recipe
from loradar_cli.recipes.losses import kl_div, trades_loss

_START_STD = 0.001  # [code] Gaussian start around x


def inner_budget(attack: AttackFn) -> tuple[float, float, int]:
    """(eps, alpha, steps) of the training attack's config; single-step attacks step the full eps once."""
    config: Any = getattr(attack, "config", None)
    eps = float(getattr(config, "eps", 8 / 255))
    steps = int(getattr(config, "steps", 1))
    alpha = float(getattr(config, "alpha", eps))
    return eps, alpha, steps


def kl_pgd(model: nn.Module, x: Tensor, eps: float, alpha: float, steps: int) -> Tensor:
    """TRADES' inner maximisation: x' in the L-inf ε-ball ∩ [0, 1] maximising KL(p(x) ‖ p(x')), eval mode."""
    with model_mode(model, "eval"):
        with torch.no_grad():
            target = model(x)
        x_adv = project_linf(x + _START_STD * torch.randn_like(x), x, eps)
        for _ in range(steps):
            grad = grad_wrt(x_adv, lambda z: kl_div(target, model(z)).sum())
            x_adv = project_linf(x_adv + alpha * grad.sign(), x, eps)
    return x_adv.detach()


class TRADESConfig(RecipeConfig):
    """β weighs the KL term (paper: 6); `inner` picks the KL maximisation or the training attack."""

    beta: float = Field(6.0, ge=0)
    inner: Literal["kl", "attack"] = "kl"


@register_recipe
class TRADES(Recipe):
    """CE(f(x), y) + β·KL(p(x) ‖ p(x_adv)); the logits returned are the adversarial ones."""

    name = "trades"
    config_cls = TRADESConfig
    config: TRADESConfig

    def step(self, model: nn.Module, x: Tensor, y: Tensor, attack: AttackFn) -> StepOutput:
        x_adv = kl_pgd(model, x, *inner_budget(attack)) if self.config.inner == "kl" else attack(model, x, y)
        logits = model(torch.cat([x, x_adv]))
        clean, adv = logits[: len(x)], logits[len(x) :]
        return StepOutput(trades_loss(clean, adv, y, self.config.beta), adv)
