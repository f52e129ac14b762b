"""MART: boosted CE on adversarial examples plus a KL term weighted towards misclassified clean points.

Wang, Zou, Yi, Bailey, Ma, Gu, "Improving Adversarial Robustness Requires Revisiting Misclassified Examples",
ICLR 2020. Threat model: the training attack's (L-inf PGD on CE in the paper).
[paper] L = BCE(p(x_adv), y) + λ·KL(p(x) ‖ p(x_adv))·(1 − p_y(x)); λ = 5 for ResNet-18 (the reference code's
default of 6 is its WideResNet setting).
"""

import torch
from pydantic import Field
from torch import Tensor, nn

from loradar_cli.recipes.base import AttackFn, Recipe, RecipeConfig, StepOutput, register_recipe
from loradar_cli.recipes.losses import mart_loss


class MARTConfig(RecipeConfig):
    """λ weighs the misclassification-aware KL term."""

    lam: float = Field(5.0, ge=0)


@register_recipe
class MART(Recipe):
    """Boosted CE on x_adv (from the training attack) + λ·(1 − p_y(x))-weighted KL(p(x) ‖ p(x_adv))."""

    name = "mart"
    config_cls = MARTConfig
    config: MARTConfig

    def step(self, model: nn.Module, x: Tensor, y: Tensor, attack: AttackFn) -> StepOutput:
        x_adv = attack(model, x, y)
        logits = model(torch.cat([x, x_adv]))
        clean, adv = logits[: len(x)], logits[len(x) :]
        return StepOutput(mart_loss(clean, adv, y, self.config.lam), adv)
